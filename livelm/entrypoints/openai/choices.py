"""Bookkeeping shared by both APIs: the state of each choice and of the whole response."""

from __future__ import annotations

from dataclasses import dataclass, field

from livelm.outputs import CompletionOutput, RequestOutput


@dataclass
class ChoiceState:
    """What one choice has produced so far."""

    index: int
    text_parts: list[str] = field(default_factory=list)
    num_tokens: int = 0
    finish_reason: str | None = None

    @property
    def text(self) -> str:
        """The generated text so far."""
        return "".join(self.text_parts)

    def add(self, delta: CompletionOutput) -> None:
        """Fold in one delta from the engine."""
        self.text_parts.append(delta.text)
        self.num_tokens += len(delta.token_ids)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason


class ResponseState:
    """All choices of one HTTP request: ``num_prompts * n`` of them, prompt-major."""

    def __init__(self, num_prompts: int, n: int) -> None:
        self.n = n
        self.choices = [ChoiceState(i) for i in range(num_prompts * n)]
        self.prompt_tokens = [0] * num_prompts
        self.cached_tokens = [0] * num_prompts  # of those, reused from the cache
        self.seen_prompt = [False] * num_prompts

    def choice_index(self, prompt_index: int, delta: CompletionOutput) -> int:
        """OpenAI numbers choices prompt by prompt, n per prompt."""
        return prompt_index * self.n + delta.index

    def first_sight(self, prompt_index: int, out: RequestOutput) -> bool:
        """Record the prompt's size the first time its request reports; True that once."""
        self.cached_tokens[prompt_index] = max(self.cached_tokens[prompt_index], out.num_cached_tokens)
        if self.seen_prompt[prompt_index]:
            return False
        self.seen_prompt[prompt_index] = True
        self.prompt_tokens[prompt_index] = len(out.prompt_token_ids)
        return True

    @property
    def completion_tokens(self) -> int:
        """Tokens generated over all choices."""
        return sum(c.num_tokens for c in self.choices)

    @property
    def finish_reason(self) -> str:
        """One reason for the whole request, for metrics: the most telling of its choices."""
        reasons = {c.finish_reason for c in self.choices}
        for reason in ("abort", "length"):
            if reason in reasons:
                return reason
        return "stop" if reasons == {"stop"} else "abort"
