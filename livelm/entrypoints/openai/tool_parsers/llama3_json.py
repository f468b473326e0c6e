"""Llama 3.1/3.2 JSON calls: the reply is ``{"name": ..., "parameters": {...}}`` (several
separated by ``;``), optionally after ``<|python_tag|>``."""

from __future__ import annotations

from livelm.entrypoints.openai.tool_parsers.base import (
    ContentText,
    ParserEvent,
    ToolParser,
    call_from_json,
    decode_json_prefix,
    held_back,
)

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    """A reply that starts with ``{`` or ``<|python_tag|>`` (or has the tag after some
    text) is held back to its end and read as calls; when it is not calls throughout, it
    is content as written. Any other reply streams as content."""

    name = "llama3_json"
    markers = (PYTHON_TAG,)

    def __init__(self) -> None:
        super().__init__()
        self._buffer = ""
        self._started = False  # seen something other than leading whitespace
        self._in_calls = False

    def feed(self, text: str) -> list[ParserEvent]:
        self._buffer += text
        if self._in_calls:
            return []
        if not self._started:
            head = self._buffer.lstrip()
            if not head or PYTHON_TAG.startswith(head):
                return []  # may still become a call
            self._started = True
            if head.startswith("{") or head.startswith(PYTHON_TAG):
                self._in_calls = True
                return []
        at = self._buffer.find(PYTHON_TAG)
        if at >= 0:
            content, self._buffer = self._buffer[:at], self._buffer[at:]
            self._in_calls = True
        else:
            keep = held_back(self._buffer, PYTHON_TAG)
            content = self._buffer[: len(self._buffer) - keep]
            self._buffer = self._buffer[len(content):]
        return [ContentText(content)] if content else []

    def finish(self) -> list[ParserEvent]:
        text, self._buffer = self._buffer, ""
        if not self._in_calls:
            return [ContentText(text)] if text else []
        calls = _calls(text)
        if calls is None:
            return [ContentText(text)]
        return [self._call(call) for call in calls]


def _calls(text: str) -> list[tuple[str, str]] | None:
    body = text.strip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG):]
    calls = []
    while body.strip():
        decoded = decode_json_prefix(body)
        call = call_from_json(decoded[0]) if decoded else None
        if call is None:
            return None
        calls.append(call)
        body = body[decoded[1]:].lstrip()
        if body.startswith(";"):
            body = body[1:]
    return calls or None
