"""Hermes-style calls (Qwen 2.5/3, Hermes, and livelm's fallback prompt):
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, any number of them, with
text around them."""

from __future__ import annotations

from livelm.entrypoints.openai.tool_parsers.base import (
    ContentText,
    ParserEvent,
    ToolParser,
    call_from_json,
    decode_json,
    split_at_marker,
)

START, END = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolParser):
    """Text outside ``<tool_call>`` tags is content; each tagged JSON object is a call (a
    tag whose JSON is not a call stays in the content as it was written)."""

    name = "hermes"
    markers = (START,)

    def __init__(self) -> None:
        super().__init__()
        self._buffer = ""
        self._in_call = False

    def feed(self, text: str) -> list[ParserEvent]:
        self._buffer += text
        events: list[ParserEvent] = []
        while True:
            if not self._in_call:
                content, rest = split_at_marker(self._buffer, START)
                if content:
                    events.append(ContentText(content))
                if rest is None:
                    self._buffer = self._buffer[len(content):]
                    return events
                self._buffer, self._in_call = rest, True
            else:
                at = self._buffer.find(END)
                if at < 0:
                    return events
                body, self._buffer = self._buffer[:at], self._buffer[at + len(END):]
                self._in_call = False
                events.append(self._body(body, closed=True))

    def finish(self) -> list[ParserEvent]:
        # A call cut off before its closing tag still counts when its JSON is whole.
        rest, self._buffer = self._buffer, ""
        if self._in_call:
            self._in_call = False
            return [self._body(rest, closed=False)]
        return [ContentText(rest)] if rest else []

    def _body(self, body: str, closed: bool) -> ParserEvent:
        call = call_from_json(decode_json(body))
        if call is None:
            return ContentText(START + body + (END if closed else ""))
        return self._call(call)
