"""What the engine core reports about a request after a step."""

from __future__ import annotations

from dataclasses import dataclass

from livelm.core.request import FinishReason
from livelm.core.scheduler_output import PromptLogprobs, SampledToken


@dataclass
class EngineCoreOutput:
    """New tokens (and logprobs) of one sequence, and whether it finished.

    ``parent_id``/``index`` identify the sequence inside a request with ``n > 1``.
    """

    request_id: str
    parent_id: str
    index: int
    new_token_ids: list[int]
    new_logprobs: list[SampledToken] | None = None
    prompt_logprobs: PromptLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        """True when this sequence has stopped."""
        return self.finish_reason is not None
