"""A conversation as the chat template takes it, tools included.

A template that reads ``tools`` (Qwen, Llama 3.1, Mistral, Hermes, ...) gets them as they
are, with assistant ``tool_calls`` and ``tool`` results in the history, and writes them in
the model's own format. A template without tool support (the default SmolLM2 model's)
gets the fallback, so any model can be used with tools:

- a system message lists the tools (name, description, parameters as JSON) and says how to
  call them: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (the Hermes
  format, which the ``auto`` parser then reads), or, for ``required`` and a named
  function, what the forced output looks like;
- an assistant message's tool calls become those ``<tool_call>`` lines in its text;
- a tool result becomes a user message ``<tool_response>...</tool_response>``.
"""

from __future__ import annotations

import json
from typing import Any

from livelm.entrypoints.openai.protocol import ChatMessage
from livelm.entrypoints.openai.tools import ToolPlan


def _arguments(text: str) -> Any:
    # Templates index into the arguments (tool_call.arguments | tojson, .items()): give
    # them the object when the text is one, else the text as it was sent.
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return text
    return value if isinstance(value, dict) else text


def uses_tool_template(messages: list[ChatMessage], plan: ToolPlan) -> bool:
    """Whether rendering needs the tool-aware path (tools offered or tool messages)."""
    return plan.offered or any(m.role == "tool" or m.tool_calls for m in messages)


def _role(message: ChatMessage) -> str:
    return "system" if message.role == "developer" else message.role


def native_messages(messages: list[ChatMessage]) -> list[dict]:
    """Messages for a template with tool support."""
    names = {c.id: c.function.name for m in messages for c in m.tool_calls or ()}
    out: list[dict] = []
    for m in messages:
        entry: dict[str, Any] = {"role": _role(m), "content": m.text()}
        if m.tool_calls:
            entry["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                for c in m.tool_calls
            ]
        if m.role == "tool":
            entry["tool_call_id"] = m.tool_call_id
            if m.tool_call_id in names:
                entry["name"] = names[m.tool_call_id]
        out.append(entry)
    return out


def _call_line(name: str, arguments: str) -> str:
    call = {"name": name, "arguments": _arguments(arguments)}
    return f"<tool_call>{json.dumps(call, ensure_ascii=False)}</tool_call>"


def _instructions(plan: ToolPlan) -> str:
    lines = ["You can call these tools (functions):"]
    lines += [json.dumps(t["function"], ensure_ascii=False) for t in plan.tools]
    if plan.mode == "required":
        lines.append('Reply only with a JSON array of tool calls: [{"name": <function name>, '
                     '"arguments": <JSON object of its parameters>}].')
    elif plan.mode == "named":
        lines.append(f"Call the function {plan.named}: reply only with the JSON object of its "
                     "arguments.")
    else:
        lines.append('To call a tool, reply with <tool_call>{"name": <function name>, '
                     '"arguments": <JSON object of its parameters>}</tool_call>, one line per '
                     "call; otherwise reply normally.")
    return "\n".join(lines)


def fallback_messages(messages: list[ChatMessage], plan: ToolPlan) -> list[dict]:
    """Messages for a template without tool support (see the module docstring)."""
    out: list[dict] = []
    for m in messages:
        if m.role == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m.text()}\n</tool_response>"})
            continue
        text = m.text()
        if m.tool_calls:
            calls = "\n".join(_call_line(c.function.name, c.function.arguments) for c in m.tool_calls)
            text = f"{text}\n{calls}" if text else calls
        out.append({"role": _role(m), "content": text})
    if plan.offered:
        instructions = _instructions(plan)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{instructions}"}
        else:
            out.insert(0, {"role": "system", "content": instructions})
    return out
