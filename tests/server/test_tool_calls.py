"""OpenAI tools on the chat API (issue 15): ``tool_choice="required"`` and a named
function forced by a JSON schema on the tiny model (non-streamed and streamed, the deltas
reassembled equal to the whole reply for the same seed); ``auto`` reading the model's own
format through a scripted engine (content around calls, held-back markers, the stream
equal to the whole reply); the template's own tool format and the fallback prompt; a
history with tool calls and results; and a 400 for each malformed use of tools."""

from __future__ import annotations

import copy
import json

import httpx
import openai
import pytest
from server_utils import serve, sse_events

from livelm.outputs import CompletionOutput, RequestOutput

CHAT = "/v1/chat/completions"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
        "unit": {"type": "string", "enum": ["C", "F"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time"}}  # no parameters
TOOLS = [WEATHER, CLOCK]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
HISTORY = MESSAGES + [
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def post(server, body: dict) -> httpx.Response:  # noqa: ANN001
    return httpx.post(f"{server.url}{CHAT}", json=body, timeout=120)


def stream_calls(server, body: dict) -> tuple[list[dict], str | None, str]:  # noqa: ANN001
    """The tool calls reassembled from a streamed reply's deltas, its finish_reason and its
    content; checks each call's first delta has id, type and name, later ones only index."""
    calls: list[dict] = []
    content, reason = "", None
    with httpx.stream("POST", f"{server.url}{CHAT}", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        chunk = json.loads(event)
        assert "error" not in chunk, chunk
        for choice in chunk["choices"]:
            delta = choice["delta"]
            content += delta.get("content") or ""
            for piece in delta.get("tool_calls", []):
                if piece["index"] == len(calls):
                    assert piece["id"].startswith("call_") and piece["type"] == "function"
                    assert piece["function"]["name"] and "arguments" in piece["function"]
                    calls.append({"name": piece["function"]["name"],
                                  "arguments": piece["function"]["arguments"]})
                else:
                    assert set(piece) == {"index", "function"}, piece
                    assert set(piece["function"]) == {"arguments"}
                    calls[piece["index"]]["arguments"] += piece["function"]["arguments"]
            reason = choice["finish_reason"] or reason
    return calls, reason, content


def check_weather_call(name: str, arguments: str) -> None:
    args = json.loads(arguments)
    if name == "get_weather":
        assert set(args) == {"city", "unit"}
        assert args["city"] in ("Paris", "Rome", "Oslo") and args["unit"] in ("C", "F")
    else:
        assert name == "get_time" and args == {}


# ------------------------------------------------------------------ forced calls (real engine)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_required_returns_well_formed_tool_calls(server, seed):
    body = {"messages": MESSAGES, "tools": TOOLS, "tool_choice": "required", "temperature": 1.0,
            "seed": seed, "max_tokens": 500}
    r = post(server, body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    message = choice["message"]
    assert message["content"] is None and message["tool_calls"]
    for call in message["tool_calls"]:
        assert call["id"].startswith("call_") and len(call["id"]) > 10 and call["type"] == "function"
        check_weather_call(call["function"]["name"], call["function"]["arguments"])
    assert len({c["id"] for c in message["tool_calls"]}) == len(message["tool_calls"])
    # The same seed streamed: the deltas reassemble to the same calls.
    calls, reason, content = stream_calls(server, body)
    assert reason == "tool_calls" and content == ""
    assert calls == [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                     for c in message["tool_calls"]]


def test_required_without_parallel_calls_makes_exactly_one(server):
    for seed in range(3):
        r = post(server, {"messages": MESSAGES, "tools": TOOLS, "tool_choice": "required",
                          "parallel_tool_calls": False, "temperature": 1.0, "seed": seed,
                          "max_tokens": 500})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        assert len(choice["message"]["tool_calls"]) == 1


def test_named_function_is_called(server):
    named = {"type": "function", "function": {"name": "get_weather"}}
    body = {"messages": MESSAGES, "tools": TOOLS, "tool_choice": named, "temperature": 0.9,
            "seed": 5, "max_tokens": 100}
    r = post(server, body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    check_weather_call("get_weather", call["function"]["arguments"])
    calls, reason, _ = stream_calls(server, body)
    assert reason == "tool_calls"
    assert calls == [{"name": "get_weather", "arguments": call["function"]["arguments"]}]


def test_openai_client_reads_forced_calls(client, server):
    model = client.models.list().data[0].id
    r = client.chat.completions.create(
        model=model, messages=MESSAGES, tools=TOOLS, tool_choice="required", temperature=0.7,
        seed=3, max_tokens=500)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    for call in choice.message.tool_calls:
        check_weather_call(call.function.name, call.function.arguments)
    # A stream the client reads: the SDK's stream object yields the same deltas.
    stream = client.chat.completions.create(
        model=model, messages=MESSAGES, tools=TOOLS, tool_choice="required", temperature=0.7,
        seed=3, max_tokens=500, stream=True)
    pieces: dict[int, list[str]] = {}
    for chunk in stream:
        for piece in chunk.choices[0].delta.tool_calls or []:
            pieces.setdefault(piece.index, []).append(piece.function.arguments or "")
    assert ["".join(p) for _, p in sorted(pieces.items())] == [
        c.function.arguments for c in choice.message.tool_calls]


def test_forced_call_cut_by_max_tokens_finishes_with_length(server):
    r = post(server, {"messages": MESSAGES, "tools": TOOLS, "tool_choice": "required",
                      "temperature": 0, "max_tokens": 3})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    assert "tool_calls" not in choice["message"] and isinstance(choice["message"]["content"], str)


def test_n_choices_each_get_their_calls(server):
    r = post(server, {"messages": MESSAGES, "tools": TOOLS, "tool_choice": "required", "n": 2,
                      "temperature": 1.0, "seed": 11, "max_tokens": 500})
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        assert choice["finish_reason"] == "tool_calls"
        for call in choice["message"]["tool_calls"]:
            check_weather_call(call["function"]["name"], call["function"]["arguments"])


# ------------------------------------------------------------------ histories and templates


def test_history_with_tool_calls_and_results_is_accepted(server, client):
    model = client.models.list().data[0].id
    r = client.chat.completions.create(model=model, messages=HISTORY, tools=TOOLS, max_tokens=5,
                                       temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # Also without tools in this turn, and through /tokenize: the tool result is in the prompt.
    r = post(server, {"messages": HISTORY, "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    ids = httpx.post(f"{server.url}/tokenize", json={"messages": HISTORY}, timeout=30).json()["tokens"]
    prompt = httpx.post(f"{server.url}/detokenize", json={"tokens": ids}, timeout=30).json()["prompt"]
    assert '<tool_response>\n{"temperature": 21}\n</tool_response>' in prompt
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}</tool_call>' in prompt


class ScriptedEngine:
    """A real engine whose replies are scripted text pieces (one list per choice); it
    records each prompt. ``tokenizer`` may be replaced (another chat template)."""

    def __init__(self, engine, tokenizer=None) -> None:  # noqa: ANN001
        self._engine = engine
        self.tokenizer = tokenizer or engine.tokenizer
        self.script: list[str] = []
        self.finish_reason = "stop"
        self.prompts: list[list[int]] = []
        self.params = []

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self._engine, name)

    async def generate(self, prompt, params, request_id=None):  # noqa: ANN001, ANN201
        self.prompts.append(list(prompt))
        self.params.append(params)
        pieces = self.script
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            outputs = [CompletionOutput(index=j, text=piece, token_ids=[5],
                                        finish_reason=self.finish_reason if last else None)
                       for j in range(params.n)]
            yield RequestOutput(request_id or "scripted", None, list(prompt), outputs, finished=last)


@pytest.fixture(scope="module")
def scripted(engine):
    fake = ScriptedEngine(engine)
    with serve(fake) as srv:
        srv.fake = fake
        yield srv


REPLY = ['Let me ', 'check. <tool', '_call>{"name": "get_weather", ', '"arguments": {"city": "Rome", ',
         '"unit": "C"}}</tool_call>\n<tool_call>{"name": "get_time", "arguments": {}}</tool_', 'call>']


def test_auto_parses_the_models_own_calls(scripted):
    scripted.fake.script = REPLY
    body = {"messages": MESSAGES, "tools": TOOLS}
    r = post(scripted, body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me check. "
    calls = [(c["function"]["name"], json.loads(c["function"]["arguments"]))
             for c in choice["message"]["tool_calls"]]
    assert calls == [("get_weather", {"city": "Rome", "unit": "C"}), ("get_time", {})]
    # The fallback prompt (the tiny model's template has no tools) told the model how.
    prompt = scripted.fake.tokenizer.decode(scripted.fake.prompts[-1])
    assert "You can call these tools" in prompt and '"name": "get_weather"' in prompt
    assert "<tool_call>" in prompt
    streamed, reason, content = stream_calls(scripted, body)
    assert reason == "tool_calls" and content == "Let me check. "
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed] == calls


def test_auto_with_no_calls_and_with_malformed_calls_is_content(scripted):
    scripted.fake.script = ["Just ", "text <tool", "ing> here"]
    r = post(scripted, {"messages": MESSAGES, "tools": TOOLS})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["content"] == "Just text <tooling> here"
    assert "tool_calls" not in choice["message"]
    assert stream_calls(scripted, {"messages": MESSAGES, "tools": TOOLS})[1:] == ("stop", "Just text <tooling> here")
    scripted.fake.script = ["<tool_call>{broken", "}</tool_call>"]
    choice = post(scripted, {"messages": MESSAGES, "tools": TOOLS}).json()["choices"][0]
    assert choice["message"]["content"] == "<tool_call>{broken}</tool_call>"
    assert choice["finish_reason"] == "stop"


def test_auto_call_cut_by_length_is_content_with_length(scripted):
    scripted.fake.script = ['<tool_call>{"name": "get_weather", "argu']
    scripted.fake.finish_reason = "length"
    try:
        choice = post(scripted, {"messages": MESSAGES, "tools": TOOLS}).json()["choices"][0]
    finally:
        scripted.fake.finish_reason = "stop"
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"] == '<tool_call>{"name": "get_weather", "argu'


def test_tool_choice_none_offers_no_tools_and_parses_nothing(scripted):
    scripted.fake.script = ['<tool_call>{"name": "get_time", "arguments": {}}</tool_call>']
    r = post(scripted, {"messages": MESSAGES, "tools": TOOLS, "tool_choice": "none"})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and "tool_calls" not in choice["message"]
    assert "You can call these tools" not in scripted.fake.tokenizer.decode(scripted.fake.prompts[-1])


def test_parallel_tool_calls_false_keeps_the_first_auto_call(scripted):
    scripted.fake.script = REPLY
    body = {"messages": MESSAGES, "tools": TOOLS, "parallel_tool_calls": False}
    calls = post(scripted, body).json()["choices"][0]["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    assert [c["name"] for c in stream_calls(scripted, body)[0]] == ["get_weather"]


def test_forced_modes_ask_the_engine_for_a_schema(scripted):
    """required and a named function reach the engine as a JSON-schema constraint."""
    scripted.fake.script = ['[{"name": "get_time", "arguments": {}}]']
    r = post(scripted, {"messages": MESSAGES, "tools": TOOLS, "tool_choice": "required"})
    assert r.json()["choices"][0]["message"]["tool_calls"][0]["function"] == {
        "name": "get_time", "arguments": "{}"}
    schema = json.loads(scripted.fake.params[-1].structured.json)
    assert schema["type"] == "array" and schema["minItems"] == 1 and "maxItems" not in schema
    assert [s["properties"]["name"]["enum"] for s in schema["items"]["anyOf"]] == [["get_weather"], ["get_time"]]
    scripted.fake.script = ['{"city": ', '"Oslo", "unit": "F"}']
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = post(scripted, {"messages": MESSAGES, "tools": TOOLS, "tool_choice": named})
    (call,) = r.json()["choices"][0]["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "F"}'}
    assert json.loads(scripted.fake.params[-1].structured.json) == WEATHER["function"]["parameters"]


QWEN_LIKE = (
    "{% if tools %}<|im_start|>system\n# Tools\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}"
    "</tools>\nCall them as <tool_call>{...}</tool_call><|im_end|>\n{% endif %}"
    "{% for m in messages %}{% if m.role == 'tool' %}<|im_start|>user\n<tool_response>{{ m.content }}"
    "</tool_response><|im_end|>\n{% elif m.tool_calls %}<|im_start|>assistant\n{% for c in m.tool_calls %}"
    "<tool_call>{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}</tool_call>"
    "{% endfor %}<|im_end|>\n{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_template_with_tools_renders_them_itself(engine):
    tokenizer = copy.deepcopy(engine.tokenizer)
    tokenizer.chat_template = QWEN_LIKE
    fake = ScriptedEngine(engine, tokenizer)
    fake.script = ['<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>']
    with serve(fake) as srv:
        assert srv.app.state.livelm.native_tools
        r = post(srv, {"messages": HISTORY, "tools": TOOLS})
    assert r.status_code == 200, r.text
    prompt = tokenizer.decode(fake.prompts[-1])
    assert "<tools>" in prompt and '"name": "get_weather"' in prompt
    assert "You can call these tools" not in prompt  # not the fallback
    assert "<tool_response>{\"temperature\": 21}</tool_response>" in prompt
    assert '"arguments": {"city": "Paris", "unit": "C"}' in prompt  # arguments as an object
    assert r.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_time"


def test_the_tool_call_parser_flag(engine):
    fake = ScriptedEngine(engine)
    fake.script = ['<tool_call>{"name": "get_time", "arguments": {}}</tool_call>']
    with serve(fake, tool_call_parser="none") as srv:
        choice = post(srv, {"messages": MESSAGES, "tools": TOOLS}).json()["choices"][0]
    assert "tool_calls" not in choice["message"] and choice["finish_reason"] == "stop"
    fake.script = ['[TOOL_CALLS][{"name": "get_time", "arguments": {}}]']
    with serve(fake, tool_call_parser="mistral") as srv:
        choice = post(srv, {"messages": MESSAGES, "tools": TOOLS}).json()["choices"][0]
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_time"
    assert fake.params[-1].skip_special_tokens is False  # [TOOL_CALLS] is a special token
    with pytest.raises(ValueError, match="tool_call_parser"):
        serve(fake, tool_call_parser="qwen")


def test_serve_flag_reaches_the_config():
    import argparse

    from livelm.entrypoints.openai.api_server import server_config_from_args
    from livelm.entrypoints.openai.tool_parsers import TOOL_PARSER_CHOICES
    from livelm.entrypoints.serve_cli import add_serve_args

    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    action = next(a for a in parser._actions if a.dest == "tool_call_parser")
    assert tuple(action.choices) == TOOL_PARSER_CHOICES
    config = server_config_from_args(parser.parse_args(["--tool-call-parser", "llama3_json"]))
    assert config.tool_call_parser == "llama3_json"
    assert server_config_from_args(parser.parse_args([])).tool_call_parser == "auto"


# ------------------------------------------------------------------ bad input -> 400

F = {"type": "function", "function": {"name": "f"}}
BAD = [
    # (body fields, param, words)
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice", "needs tools"),
    ({"tools": [F], "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice",
     "not in tools"),
    ({"tools": [F], "tool_choice": "sometimes"}, "tool_choice", None),
    ({"tools": [F], "tool_choice": {"type": "function"}}, "tool_choice.function", None),
    ({"tools": [F, F]}, "tools", "distinct"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type", None),
    ({"tools": [{"type": "function"}]}, "tools.0.function", None),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools.0.function.name", None),
    ({"tools": [{"type": "function", "function": {"name": "x" * 65}}]}, "tools.0.function.name", None),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]},
     "tools.0.function.parameters", None),
    ({"tools": [{"type": "function", "function": {"name": "f", "description": "d" * 9000}}]},
     "tools.0.function.description", None),
    ({"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]}, "tools", "at most 128"),
    ({"tools": {"type": "function"}}, "tools", None),
    ({"tools": [F], "parallel_tool_calls": "no"}, "parallel_tool_calls", None),
    ({"tools": [F], "response_format": {"type": "json_object"}}, "response_format", "tool_choice"),
    ({"tools": [F], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format", "at most one"),
    ({"tools": [F], "tool_choice": "required", "guided_regex": "a+"}, "guided_regex", "at most one"),
    ({"messages": [{"role": "tool", "content": "21"}]}, "messages.0", "tool_call_id"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
     "messages.0", "assistant"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f"}}]}]},
     "messages.0.tool_calls.0.function.arguments", None),
]


@pytest.mark.parametrize(("fields", "param", "words"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_malformed_tools_get_a_400(server, fields, param, words):
    for stream in (False, True):
        r = post(server, {"messages": MESSAGES, "max_tokens": 2, **fields, "stream": stream})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param, error
        if words:
            assert words in error["message"], error


def test_invalid_tool_schema_is_refused_before_compute(server):
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "object",
           "properties": {"x": {"type": "string", "pattern": "(unclosed"}}}}}
    r = post(server, {"messages": MESSAGES, "tools": [bad], "tool_choice": "required"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "tools"
