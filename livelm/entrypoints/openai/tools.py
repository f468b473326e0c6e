"""What a chat request's ``tools``, ``tool_choice`` and ``parallel_tool_calls`` ask for,
checked at admission: which tools the prompt offers, and how the reply is read.

- ``none``: no tools are offered to the template and the reply is plain content.
- ``auto`` (the default with tools): the tools are offered and the model's own call
  format is parsed from its text (a parser chosen from the chat template, or by
  ``--tool-call-parser``).
- ``required``: the output is forced by a JSON schema to be an array of 1 or more calls
  (exactly 1 when ``parallel_tool_calls`` is false) ``{"name": <a tool's name>,
  "arguments": <that tool's parameters>}``.
- a named function: the output is forced to be that function's arguments object.

Forcing goes through ``SamplingParams.structured``, so it works with any model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from livelm.entrypoints.openai.errors import OpenAIError
from livelm.entrypoints.openai.protocol import ChatCompletionRequest, NamedToolChoice
from livelm.entrypoints.openai.tool_parsers import ToolParser
from livelm.entrypoints.openai.tool_parsers.enforced import ArgumentsReader, CallArrayReader
from livelm.sampling_params import is_valid_unicode
from livelm.structured_output import MAX_SPEC_CHARS, StructuredOutput

# The parameters of a function that declares none: it takes no arguments.
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class ToolPlan:
    """How one chat request uses tools (``mode``: none, auto, required or named)."""

    mode: str = "none"
    tools: tuple[dict[str, Any], ...] = ()  # OpenAI-shaped, as the template takes them
    named: str | None = None
    parallel: bool = True
    parser: type[ToolParser] | None = None  # auto only; None: the reply is not parsed
    structured: StructuredOutput | None = field(default=None, compare=False)

    @property
    def offered(self) -> bool:
        """Whether the prompt describes the tools to the model."""
        return self.mode != "none" and bool(self.tools)

    @property
    def enforced(self) -> bool:
        """Whether the reply is forced to be tool calls."""
        return self.mode in ("required", "named")

    @property
    def reads_calls(self) -> bool:
        """Whether the reply is read for tool calls at all."""
        return self.enforced or (self.mode == "auto" and self.parser is not None)

    def reader(self) -> Any:
        """A fresh reader of one choice's reply (parser or enforced-JSON reader)."""
        if self.mode == "required":
            return CallArrayReader()
        if self.mode == "named":
            return ArgumentsReader(self.named or "")
        return self.parser() if self.parser is not None else None


NO_TOOLS = ToolPlan()


def _parameters(tool: Any, index: int) -> dict[str, Any]:
    params = tool.function.parameters
    if params is None:
        return NO_PARAMETERS
    param = f"tools.{index}.function.parameters"
    try:
        text = json.dumps(params, ensure_ascii=False, allow_nan=False)
    except (ValueError, TypeError, RecursionError):
        raise OpenAIError(f"{param} must be a JSON schema without NaN or Infinity", 400,
                          param=param) from None
    if len(text) > MAX_SPEC_CHARS:
        raise OpenAIError(f"{param} must be at most {MAX_SPEC_CHARS} characters of JSON, got "
                          f"{len(text)}", 400, param=param)
    if not is_valid_unicode(text):
        raise OpenAIError(f"{param} is not valid Unicode (it holds a lone surrogate)", 400,
                          param=param)
    return params


def _call_schema(name: str, params: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"type": "string", "enum": [name]}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def tool_plan(req: ChatCompletionRequest, parser: type[ToolParser] | None) -> ToolPlan:
    """The request's use of tools, or a 400 (tool_choice without tools, an unknown
    function, duplicate names, parameters that are not a bounded JSON schema)."""
    tools = req.tools or []
    choice = req.tool_choice
    if not tools:
        if choice is not None and choice != "none":
            raise OpenAIError("tool_choice needs tools: give the functions in tools", 400,
                              param="tool_choice")
        return NO_TOOLS
    names = [t.function.name for t in tools]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise OpenAIError(f"tools must have distinct names; repeated: {', '.join(duplicates)}",
                          400, param="tools")
    params = {t.function.name: _parameters(t, i) for i, t in enumerate(tools)}
    template_tools = tuple(
        {"type": "function", "function": {
            "name": t.function.name,
            **({"description": t.function.description} if t.function.description else {}),
            "parameters": params[t.function.name],
        }}
        for t in tools
    )
    parallel = req.parallel_tool_calls is not False
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        if name not in params:
            shown = name if len(name) <= 64 else name[:64] + "..."
            raise OpenAIError(f"tool_choice names the function {shown!r}, which is not in tools "
                              f"({', '.join(names[:8])}{', ...' if len(names) > 8 else ''})",
                              400, param="tool_choice")
        return ToolPlan("named", template_tools, name, parallel,
                        structured=_structured(params[name], "tool_choice"))
    mode = choice or "auto"
    if mode == "required":
        items = [_call_schema(n, p) for n, p in params.items()]
        schema = {"type": "array", "minItems": 1,
                  "items": items[0] if len(items) == 1 else {"anyOf": items}}
        if not parallel:
            schema["maxItems"] = 1
        return ToolPlan("required", template_tools, None, parallel,
                        structured=_structured(schema, "tools"))
    return ToolPlan(mode, template_tools, None, parallel, parser if mode == "auto" else None)


def _structured(schema: dict[str, Any], param: str) -> StructuredOutput:
    try:
        return StructuredOutput(json=schema)
    except ValueError as exc:  # too large a schema over all tools, for one
        raise OpenAIError(f"{param}: {exc}", 400, param=param) from exc
