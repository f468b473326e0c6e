"""One chat choice's reply read for tool calls: content deltas and ``tool_calls`` deltas
as OpenAI streams them, and the whole message built from the very same deltas.

The first delta of a call carries its index, ``id``, ``type`` and ``function.name`` (with
the arguments so far, possibly ""); later deltas carry argument fragments with the index
only. Whitespace-only content is held until other content follows, and dropped when the
message turns out to be tool calls, so that text between calls does not leak.
"""

from __future__ import annotations

import uuid
from typing import Any

from livelm.entrypoints.openai.protocol import (
    ChatDelta,
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
)
from livelm.entrypoints.openai.tool_parsers import (
    CallArguments,
    CallStart,
    ContentText,
    ParserEvent,
)
from livelm.entrypoints.openai.tools import ToolPlan


def call_id() -> str:
    """An OpenAI-looking tool call id, ``call_`` and 24 hex digits."""
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallStream:
    """Turns one choice's text deltas into chat deltas (see the module docstring)."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.reader: Any = plan.reader()
        self.text_parts: list[str] = []  # everything the model wrote
        self.content_parts: list[str] = []  # the content sent
        self.calls: list[list[str]] = []  # [id, name, arguments sent]
        self._held = ""

    def feed(self, text: str) -> list[ChatDelta]:
        """The deltas for the next piece of generated text."""
        if not text:
            return []
        self.text_parts.append(text)
        return self._deltas(self.reader.feed(text))

    def finish(self) -> list[ChatDelta]:
        """The deltas of what was held back, once the generation ended."""
        deltas = self._deltas(self.reader.finish())
        if self._held and not self.calls:
            deltas.append(self._content(self._held, force=True))
        self._held = ""
        return [d for d in deltas if d is not None]

    @property
    def has_calls(self) -> bool:
        """Whether the reply holds tool calls (the finish reason is then ``tool_calls``)."""
        return bool(self.calls)

    def finish_reason(self, engine_reason: str | None) -> str | None:
        """``tool_calls`` for a reply of calls that ended normally (forced calls: only
        once their JSON closed); else the engine's."""
        if self.plan.enforced and not self.reader.complete:
            return engine_reason
        return "tool_calls" if self.calls and engine_reason == "stop" else engine_reason

    def message(self, engine_reason: str | None) -> tuple[str | None, list[ToolCall] | None]:
        """``(content, tool_calls)`` of the whole reply, after :meth:`finish`. Forced calls
        that never closed (``max_tokens`` hit first) give the text as plain content."""
        if self.plan.enforced and not self.reader.complete:
            return "".join(self.text_parts), None
        content = "".join(self.content_parts)
        if not self.calls:
            return content, None
        calls = [ToolCall(id=i, function=FunctionCall(name=n, arguments=a)) for i, n, a in self.calls]
        return content or None, calls

    # ---------------------------------------------------------------- internals

    def _deltas(self, events: list[ParserEvent]) -> list[ChatDelta]:
        deltas = []
        for event in events:
            delta = self._delta(event)
            if delta is not None:
                deltas.append(delta)
        return deltas

    def _delta(self, event: ParserEvent) -> ChatDelta | None:
        if isinstance(event, ContentText):
            return self._content(event.text)
        if not self.plan.parallel and event.index > 0:
            return None  # parallel_tool_calls=false: the first call only
        if isinstance(event, CallStart):
            self.calls.append([call_id(), event.name, event.arguments])
            index = len(self.calls) - 1
            return ChatDelta(tool_calls=[DeltaToolCall(
                index=index, id=self.calls[index][0], type="function",
                function=DeltaFunctionCall(name=event.name, arguments=event.arguments))])
        assert isinstance(event, CallArguments)
        if not event.arguments:
            return None
        self.calls[event.index][2] += event.arguments
        return ChatDelta(tool_calls=[DeltaToolCall(
            index=event.index, function=DeltaFunctionCall(arguments=event.arguments))])

    def _content(self, text: str, force: bool = False) -> ChatDelta | None:
        pending = self._held + text
        if not force and not pending.strip():
            self._held = pending
            return None
        self._held = ""
        self.content_parts.append(pending)
        return ChatDelta(content=pending)
