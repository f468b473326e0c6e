"""Mistral calls: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` after any
content, or the newer tokenizers' ``[TOOL_CALLS]name[ARGS]{...}`` (one marker per call).
``[TOOL_CALLS]`` is a special token, so the reply keeps special tokens."""

from __future__ import annotations

from livelm.entrypoints.openai.tool_parsers.base import (
    ContentText,
    ParserEvent,
    ToolParser,
    call_from_json,
    decode_json_prefix,
    held_back,
    split_at_marker,
)

MARKER = "[TOOL_CALLS]"
ARGS = "[ARGS]"
# The end-of-sequence token's text, which the kept special tokens bring into the text.
EOS = "</s>"


class MistralToolParser(ToolParser):
    """Content until ``[TOOL_CALLS]``, then a JSON array (or one object) of calls; an
    array that is not calls throughout stays in the content as written."""

    name = "mistral"
    markers = (MARKER,)
    skip_special_tokens = False

    def __init__(self) -> None:
        super().__init__()
        self._buffer = ""
        self._in_calls = False

    def feed(self, text: str) -> list[ParserEvent]:
        self._buffer += text
        return self._run()

    def _run(self) -> list[ParserEvent]:
        events: list[ParserEvent] = []
        while True:
            if not self._in_calls:
                content, rest = split_at_marker(self._buffer, MARKER)
                if rest is None:  # the end of the content may still be the start of EOS
                    content = content[: len(content) - held_back(content, EOS)]
                    self._buffer = self._buffer[len(content):]
                if content.replace(EOS, ""):
                    events.append(ContentText(content.replace(EOS, "")))
                if rest is None:
                    return events
                self._buffer, self._in_calls = rest, True
            # Try to read the calls only once the text could have closed them.
            if "]" not in self._buffer and "}" not in self._buffer:
                return events
            if not self._read_calls(events):
                return events

    def _read_calls(self, events: list[ParserEvent]) -> bool:
        """Read the calls at the start of the buffer into ``events``; False while they are
        not whole yet."""
        head = self._buffer.lstrip()
        if head and head[0] not in "[{":
            return self._read_named_call(events)
        decoded = decode_json_prefix(self._buffer)
        if decoded is None:
            return False
        calls = _calls(decoded[0])
        if calls is None:
            events.append(ContentText(MARKER + self._buffer[: decoded[1]]))
        else:
            events += [self._call(call) for call in calls]
        self._buffer, self._in_calls = self._buffer[decoded[1]:], False
        return True

    def _read_named_call(self, events: list[ParserEvent]) -> bool:
        """``name[ARGS]{...}``: one call, once its arguments are whole."""
        at = self._buffer.find(ARGS)
        if at < 0:
            return False
        name = self._buffer[:at].strip()
        decoded = decode_json_prefix(self._buffer[at + len(ARGS):])
        if decoded is None:
            return False
        end = at + len(ARGS) + decoded[1]
        call = call_from_json({"name": name, "arguments": decoded[0]}) if name else None
        if call is None:
            events.append(ContentText(MARKER + self._buffer[:end]))
        else:
            events.append(self._call(call))
        self._buffer, self._in_calls = self._buffer[end:], False
        return True

    def finish(self) -> list[ParserEvent]:
        self._buffer = self._buffer.replace(EOS, "")
        events = self._run()
        if self._in_calls:  # calls that never closed: content as written
            events.append(ContentText(MARKER + self._buffer))
        elif self._buffer:
            events.append(ContentText(self._buffer))
        self._buffer, self._in_calls = "", False
        return events


def _calls(value: object) -> list[tuple[str, str]] | None:
    items = value if isinstance(value, list) else [value]
    calls = [call_from_json(item) for item in items]
    if not calls or any(call is None for call in calls):
        return None
    return calls  # type: ignore[return-value]
