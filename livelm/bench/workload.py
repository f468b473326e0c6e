"""What a benchmark sends: sessions of one or more turns, and how chat turns become prompts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Turn:
    """One request of a session.

    ``text`` is a completion prompt, or in a chat session this turn's user message; ``ids``
    are its exact token ids (offline runs and ``--prompt-format ids`` send these).
    ``think_time_s`` is the user's pause between the previous reply and this turn.
    """

    text: str
    ids: list[int]
    output_len: int
    think_time_s: float = 0.0


@dataclass
class Session:
    """A single request, or a conversation whose turns each resend the whole history.

    ``arrival_s`` (seconds from the start of the run) comes from a trace or JSONL file;
    None lets the arrival process (request rate) decide. In a chat session,
    ``prefix_messages`` (a system prompt, earlier turns given by the file) precede the turns.
    """

    turns: list[Turn]
    arrival_s: float | None = None
    chat: bool = False
    prefix_messages: list[dict] = field(default_factory=list)

    def messages(self, turn: int, replies: list[str]) -> list[dict]:
        """The chat messages of turn ``turn``, given the replies to the earlier turns."""
        msgs = list(self.prefix_messages)
        for k in range(turn):
            msgs.append({"role": "user", "content": self.turns[k].text})
            msgs.append({"role": "assistant", "content": replies[k]})
        msgs.append({"role": "user", "content": self.turns[turn].text})
        return msgs


@dataclass
class Workload:
    """A named list of sessions plus the parameters that made it (for result records)."""

    name: str
    sessions: list[Session]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def num_requests(self) -> int:
        """Requests over all sessions and turns."""
        return sum(len(s.turns) for s in self.sessions)

    @property
    def has_timestamps(self) -> bool:
        """True when every session carries its own arrival time (a trace)."""
        return bool(self.sessions) and all(s.arrival_s is not None for s in self.sessions)

    @property
    def is_chat(self) -> bool:
        """True when any session is a conversation."""
        return any(s.chat for s in self.sessions)

    def describe(self) -> str:
        """One line for tables and logs."""
        extras = ", ".join(f"{k}={v}" for k, v in self.params.items() if v is not None)
        return f"{self.name} ({self.num_requests} req{', ' + extras if extras else ''})"


def render_plain_chat(messages: list[dict]) -> str:
    """A conversation as plain text, for models without a chat template and for servers
    reached through ``/v1/completions``."""
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nassistant:"


def chat_prompt_ids(tokenizer: Any, messages: list[dict]) -> list[int]:
    """Token ids of a conversation through the tokenizer's chat template (or plain text)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = render_plain_chat(messages)
    # A template writes the special tokens it wants; none are added on top.
    return list(tokenizer(text, add_special_tokens=False).input_ids)
