"""Tool-call parsers: one module per model format (``tool_choice="auto"``), chosen from
the chat template's markers or by ``--tool-call-parser``, and the reader of the JSON that
``tool_choice="required"`` or a named function forces (``enforced.py``)."""

from __future__ import annotations

from livelm.entrypoints.openai.tool_parsers.base import (
    CallArguments,
    CallStart,
    ContentText,
    ParserEvent,
    ToolParser,
    parse_all,
)
from livelm.entrypoints.openai.tool_parsers.hermes import HermesToolParser
from livelm.entrypoints.openai.tool_parsers.llama3_json import Llama3JsonToolParser
from livelm.entrypoints.openai.tool_parsers.mistral import MistralToolParser

# In the order they are looked for in a chat template (Mistral's marker is the most
# specific; Llama 3 templates may also mention <tool_call> in examples, not the reverse).
TOOL_PARSERS: dict[str, type[ToolParser]] = {
    cls.name: cls for cls in (MistralToolParser, HermesToolParser, Llama3JsonToolParser)
}
TOOL_PARSER_CHOICES = ("auto", "hermes", "llama3_json", "mistral", "none")
# What "auto" picks for a template that shows none of the markers: the format that
# livelm's fallback tool prompt asks for (docs/serving.md#tool-calling).
DEFAULT_TOOL_PARSER = "hermes"


def detect_tool_parser(chat_template: str | None) -> str:
    """The parser whose markers the chat template contains (Llama 3 templates are also
    told by their ``ipython`` role), else :data:`DEFAULT_TOOL_PARSER`."""
    text = chat_template or ""
    for name, cls in TOOL_PARSERS.items():
        if any(marker in text for marker in cls.markers):
            return name
    if "ipython" in text and "<|eot_id|>" in text:
        return "llama3_json"
    return DEFAULT_TOOL_PARSER


def resolve_tool_parser(choice: str, chat_template: str | None) -> type[ToolParser] | None:
    """The parser class of ``--tool-call-parser`` (``auto``: from the template); None for
    ``none`` (calls in the text are then left as content)."""
    if choice not in TOOL_PARSER_CHOICES:
        raise ValueError(f"tool_call_parser must be one of {', '.join(TOOL_PARSER_CHOICES)}, got {choice!r}")
    if choice == "none":
        return None
    return TOOL_PARSERS[detect_tool_parser(chat_template) if choice == "auto" else choice]


__all__ = [
    "DEFAULT_TOOL_PARSER",
    "TOOL_PARSERS",
    "TOOL_PARSER_CHOICES",
    "CallArguments",
    "CallStart",
    "ContentText",
    "ParserEvent",
    "ToolParser",
    "detect_tool_parser",
    "parse_all",
    "resolve_tool_parser",
]
