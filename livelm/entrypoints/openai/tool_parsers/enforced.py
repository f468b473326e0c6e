"""Reading the output that ``tool_choice="required"`` or a named function forces, while it
streams: the arguments are sent as they are generated.

``required`` makes the model write a JSON array of ``{"name": ..., "arguments": {...}}``
objects; a named function makes it write that function's arguments object alone. The
JSON is scanned character by character (strings and escapes tracked), so each call starts
as soon as its name is complete and its arguments stream verbatim: the fragments of a call
always join to exactly the text the model wrote for them.
"""

from __future__ import annotations

import json

from livelm.entrypoints.openai.tool_parsers.base import CallArguments, CallStart, ParserEvent


class _Call:
    def __init__(self) -> None:
        self.name: str | None = None
        self.args_start: int | None = None
        self.args_end: int | None = None
        self.sent = -1  # text position up to which the arguments were sent; -1: not started
        self.closed = False


class CallArrayReader:
    """Incremental reader of ``[{"name": "f", "arguments": {...}}, ...]``.

    Key order does not matter (arguments that come before the name are held until the
    name is known). ``complete`` is true once the array closed with every call whole.
    """

    def __init__(self) -> None:
        self.text = ""
        self.calls: list[_Call] = []
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._string_role: str | None = None  # "key" or "value" of a call object
        self._string_start = 0
        self._expect = "key"  # inside a call object: key, colon, value, after
        self._key: str | None = None
        self._value_kind: str | None = None  # container, string, scalar
        self._value_start = 0
        self._array_closed = False

    @property
    def complete(self) -> bool:
        """The array closed and every call in it has a name and whole arguments."""
        return self._array_closed and bool(self.calls) and all(
            c.closed and c.name is not None and c.args_end is not None for c in self.calls
        )

    def feed(self, text: str) -> list[ParserEvent]:
        """Calls that started and argument fragments that arrived with ``text``."""
        start = len(self.text)
        self.text += text
        for pos in range(start, len(self.text)):
            self._step(self.text[pos], pos)
        return self._events()

    def finish(self) -> list[ParserEvent]:
        """Nothing more arrives: a scalar value at the very end is whole now."""
        if self._value_kind == "scalar":
            self._value_end(len(self.text))
        return self._events()

    # ------------------------------------------------------------------ scanning

    def _step(self, ch: str, pos: int) -> None:
        if self._in_string:
            if self._escape:
                self._escape = False
            elif ch == "\\":
                self._escape = True
            elif ch == '"':
                self._in_string = False
                if self._string_role == "key":
                    self._key = _decode(self.text[self._string_start: pos + 1])
                    self._expect = "colon"
                elif self._string_role == "value":
                    self._value_end(pos + 1)
            return
        if self._value_kind == "scalar" and self._depth == 2 and (ch in ",}" or ch.isspace()):
            self._value_end(pos)
        in_object = self._depth == 2 and bool(self.calls)
        if ch == '"':
            self._in_string, self._string_role = True, None
            if in_object and self._expect == "key":
                self._string_role, self._string_start = "key", pos
            elif in_object and self._expect == "value":
                self._string_role = "value"
                self._value_begin(pos, "string")
        elif ch in "{[":
            if self._depth == 0 and ch == "[":
                pass
            elif self._depth == 1 and ch == "{":
                self.calls.append(_Call())
                self._expect, self._key = "key", None
            elif in_object and self._expect == "value":
                self._value_begin(pos, "container")
            self._depth += 1
        elif ch in "}]":
            self._depth -= 1
            if self._depth == 2 and self._value_kind == "container":
                self._value_end(pos + 1)
            elif self._depth == 1 and ch == "}" and self.calls:
                self.calls[-1].closed = True
            elif self._depth == 0 and ch == "]":
                self._array_closed = True
        elif in_object and ch == ":" and self._expect == "colon":
            self._expect = "value"
        elif in_object and ch == ",":
            self._expect = "key"
        elif in_object and self._expect == "value" and not ch.isspace():
            self._value_begin(pos, "scalar")

    def _value_begin(self, pos: int, kind: str) -> None:
        self._value_kind, self._value_start, self._expect = kind, pos, "after"
        if self._key in ("arguments", "parameters"):
            self.calls[-1].args_start = pos

    def _value_end(self, end: int) -> None:
        call = self.calls[-1]
        if self._key in ("arguments", "parameters") and call.args_start == self._value_start:
            call.args_end = end
        elif self._key == "name" and self._value_kind == "string":
            name = _decode(self.text[self._value_start: end])
            call.name = name if isinstance(name, str) else None
        self._value_kind = None

    # ------------------------------------------------------------------ events

    def _events(self) -> list[ParserEvent]:
        events: list[ParserEvent] = []
        for index, call in enumerate(self.calls):
            if call.name is None:
                continue
            if call.args_start is None:
                piece_start = piece_end = 0
            else:
                piece_start = max(call.sent, call.args_start)
                piece_end = call.args_end if call.args_end is not None else len(self.text)
            piece = self.text[piece_start:piece_end]
            if call.sent < 0:
                events.append(CallStart(index, call.name, piece))
            elif piece:
                events.append(CallArguments(index, piece))
            call.sent = piece_end if call.args_start is not None else 0
        return events


class ArgumentsReader:
    """Incremental reader of a named function's output: its arguments object alone.

    The call starts with the first character that is not whitespace; ``complete`` once
    the text is one JSON object.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.text = ""
        self._started = False

    @property
    def complete(self) -> bool:
        """The output is one whole JSON object."""
        return isinstance(_decode(self.text), dict)

    def feed(self, text: str) -> list[ParserEvent]:
        """The call's start (with the first piece), then argument fragments."""
        if not self._started:
            text = text.lstrip()
            if not text:
                return []
            self._started = True
            self.text += text
            return [CallStart(0, self.name, text)]
        self.text += text
        return [CallArguments(0, text)] if text else []

    def finish(self) -> list[ParserEvent]:
        """Nothing is held back."""
        return []


def _decode(text: str) -> object:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None
