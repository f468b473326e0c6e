"""What every tool-call parser shares: the events it emits, the incremental interface, and
the helpers that find a marker in streamed text and read one call's JSON.

A parser is fed the generated text piece by piece (``feed``) and told when it ends
(``finish``); it answers with events: text that is ordinary content, and tool calls. The
non-streamed response feeds the whole text at once through the same code, so a stream's
deltas always reassemble to the non-streamed message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class ContentText:
    """Generated text that is ordinary message content."""

    text: str


@dataclass(frozen=True)
class CallStart:
    """A tool call begins: its index in the message, the function's name and the first
    piece of its arguments (JSON text, possibly empty)."""

    index: int
    name: str
    arguments: str


@dataclass(frozen=True)
class CallArguments:
    """More of the arguments (JSON text) of the call at ``index``."""

    index: int
    arguments: str


ParserEvent = ContentText | CallStart | CallArguments


class ToolParser:
    """Base of the parsers of a model's own tool-call format (``tool_choice="auto"``).

    Subclasses set ``name`` (the ``--tool-call-parser`` value), ``markers`` (text whose
    presence in a chat template selects the parser) and implement ``feed`` / ``finish``.
    ``skip_special_tokens`` is False for formats whose marker is a special token (it
    would be dropped from the text otherwise).
    """

    name: ClassVar[str] = ""
    markers: ClassVar[tuple[str, ...]] = ()
    skip_special_tokens: ClassVar[bool] = True

    def __init__(self) -> None:
        self.num_calls = 0

    def feed(self, text: str) -> list[ParserEvent]:
        """Events for the next piece of generated text (text that may still turn out to
        start a call is held back)."""
        raise NotImplementedError

    def finish(self) -> list[ParserEvent]:
        """Events for what is still held back once the generation ended."""
        raise NotImplementedError

    def _call(self, call: tuple[str, str]) -> CallStart:
        event = CallStart(self.num_calls, call[0], call[1])
        self.num_calls += 1
        return event


def parse_all(parser: ToolParser, text: str) -> tuple[str, list[tuple[str, str]]]:
    """The content and ``(name, arguments)`` calls of a whole text (tests, whole replies)."""
    content: list[str] = []
    calls: list[list[str]] = []
    for event in parser.feed(text) + parser.finish():
        if isinstance(event, ContentText):
            content.append(event.text)
        elif isinstance(event, CallStart):
            calls.append([event.name, event.arguments])
        else:
            calls[event.index][1] += event.arguments
    return "".join(content), [(name, args) for name, args in calls]


def held_back(text: str, marker: str) -> int:
    """How many characters at the end of ``text`` could be the start of ``marker`` (they
    must wait for the next piece before being sent as content)."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


def split_at_marker(buffer: str, marker: str) -> tuple[str, str | None]:
    """``(content, rest)``: the text before ``marker`` and what follows it, or, when the
    marker is not (yet) there, the text that surely is content and ``None`` (the possible
    start of a marker stays in the caller's buffer)."""
    at = buffer.find(marker)
    if at >= 0:
        return buffer[:at], buffer[at + len(marker):]
    keep = held_back(buffer, marker)
    return buffer[: len(buffer) - keep], None


ARGUMENT_KEYS = ("arguments", "parameters")


def call_from_json(obj: Any) -> tuple[str, str] | None:
    """``(name, arguments JSON text)`` of a decoded call object ``{"name": ..., "arguments"
    | "parameters": {...}}``, or None when it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args: Any = {}
    for key in ARGUMENT_KEYS:
        if key in obj:
            args = obj[key]
            break
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except (json.JSONDecodeError, RecursionError):
            return None
    if not isinstance(args, dict):
        return None
    return obj["name"], json.dumps(args, ensure_ascii=False)


def decode_json(text: str) -> Any:
    """The JSON value of ``text`` (surrounding whitespace allowed), or ``None`` when it is
    not exactly one JSON value."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None


def decode_json_prefix(text: str) -> tuple[Any, int] | None:
    """The first JSON value in ``text`` (after whitespace) and where it ends, or None."""
    start = len(text) - len(text.lstrip())
    try:
        return json.JSONDecoder().raw_decode(text, start)
    except (json.JSONDecodeError, RecursionError):
        return None
