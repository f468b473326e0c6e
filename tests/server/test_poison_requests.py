"""One bad request must never hurt anyone else (issue 23): every request found to hurt a
real ``livelm serve`` is refused at admission with an OpenAI-style 4xx naming the field (or,
where it is legitimate, served), while a greedy victim request started before it streams on
and ends exactly as it does alone.

Bodies are raw JSON text, so ``NaN``, ``Infinity``, integers beyond 64 bits and lone
surrogates (``"\\ud800"``) reach the server as a client would send them.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
from server_utils import serve, start_engine, stop_engine
from websockets.sync.client import connect

C, CHAT = "/v1/completions", "/v1/chat/completions"
VICTIM = {"prompt": "The quick brown fox", "temperature": 0, "max_tokens": 160, "ignore_eos": True}
MAX_NUM_SEQS = 8


@pytest.fixture(scope="module")
def engine(llama_dir):
    engine = start_engine(llama_dir, max_model_len=512, max_num_seqs=MAX_NUM_SEQS)
    yield engine
    stop_engine(engine)


@pytest.fixture(scope="module")
def server(engine):
    with serve(engine) as srv:  # the defaults of livelm serve: 8 MiB bodies, 512 waiting
        yield srv


@pytest.fixture(scope="module")
def expected(server) -> str:
    """The victim's text when it runs alone."""
    r = httpx.post(f"{server.url}{C}", json=VICTIM, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def post_raw(server, path: str, raw: str | bytes, timeout: float = 30) -> httpx.Response:
    content = raw.encode() if isinstance(raw, str) else raw
    return httpx.post(f"{server.url}{path}", content=content,
                      headers={"Content-Type": "application/json"}, timeout=timeout)


def with_victim(server, expected: str, poison):  # noqa: ANN001, ANN201
    """Start the victim (streamed), run ``poison()`` once it is generating, then check that
    the victim ends as it does alone; returns what ``poison()`` returned."""
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{server.url}{C}", json={**VICTIM, "stream": True}) as victim:
            assert victim.status_code == 200
            lines = victim.iter_lines()
            events = [next(line for line in lines if line.startswith("data: "))]
            result = poison()
            events += [line for line in lines if line.startswith("data: ")]
    payloads = [e[len("data: "):] for e in events]
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all("error" not in c for c in chunks), chunks[-1]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == expected
    return result


def assert_openai_error(r: httpx.Response, status: int = 400, param: str | None = None,
                        words: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if words is not None:
        assert words in error["message"], error
    assert "Traceback" not in error["message"] and "Error(" not in error["message"]
    return error


def _body(fields: str, prompt: str = '"hi"') -> str:
    return '{"prompt": ' + prompt + ', "max_tokens": 2, ' + fields + "}"


def _chat(fields: str, content: str = '"hi"') -> str:
    return '{"messages": [{"role": "user", "content": ' + content + '}], "max_tokens": 2, ' + fields + "}"


POISON = [
    # (route, raw body, param, words in the message)
    (C, _body('"seed": 1180591620717411303424'), "seed", "2**63 - 1"),
    (C, _body('"seed": -1'), "seed", "non-negative"),
    (C, _body('"seed": 18446744073709551616'), "seed", None),
    (C, _body('"temperature": NaN'), "temperature", "finite"),
    (C, _body('"temperature": Infinity'), "temperature", "finite"),
    (C, _body('"temperature": -Infinity'), "temperature", "finite"),
    (C, _body('"temperature": 1e10'), "temperature", "[0, 100]"),
    (C, _body('"temperature": 1e999'), "temperature", None),
    (C, _body('"repetition_penalty": NaN'), "repetition_penalty", "finite"),
    (C, _body('"repetition_penalty": Infinity'), "repetition_penalty", "finite"),
    (C, _body('"repetition_penalty": 1e-300'), "repetition_penalty", "[0.01, 100]"),
    (C, _body('"top_p": NaN'), "top_p", None),
    (C, _body('"presence_penalty": NaN'), "presence_penalty", None),
    (CHAT, _chat('"frequency_penalty": -Infinity'), "frequency_penalty", None),
    (CHAT, _chat('"temperature": NaN, "stream": true'), "temperature", "finite"),
    (C, _body('"stream": "yes"'), "stream", "boolean"),
    (C, _body('"stream": 1'), "stream", "boolean"),
    (C, _body('"echo": "true"'), "echo", "boolean"),
    (C, _body('"ignore_eos": 1'), "ignore_eos", None),
    (C, _body('"skip_special_tokens": "no"'), "skip_special_tokens", None),
    (C, _body('"include_stop_str_in_output": 0'), "include_stop_str_in_output", None),
    (CHAT, _chat('"logprobs": "yes"'), "logprobs", None),
    (C, _body('"stream": true, "stream_options": {"include_usage": "yes"}'),
     "stream_options.include_usage", None),
    (C, _body('"max_tokens": true'), "max_tokens", "boolean"),  # the last of a key wins
    (C, _body('"n": true'), "n", "boolean"),
    (C, _body('"n": 1000'), "n", "at most 16"),
    (C, _body('"n": 1000, "stream": true'), "n", "at most 16"),
    (C, _body('"n": 1000, "best_of": 1000'), "n", None),
    (CHAT, _chat('"n": 9'), "n", f"at most {MAX_NUM_SEQS}"),
    (C, _body('"stop_token_ids": [1000000000]'), "stop_token_ids", "outside the vocabulary"),
    (C, _body('"stop_token_ids": [1000000000], "stream": true'), "stop_token_ids", "outside"),
    (CHAT, _chat('"stop_token_ids": [18446744073709551616]'), "stop_token_ids", "outside"),
    (C, _body('"stop_token_ids": [-1]'), "stop_token_ids", None),
    (C, _body('"stop": "' + "x" * 100_000 + '"'), "stop", "at most 256 characters"),
    (C, _body('"stop": [' + ", ".join(['"s"'] * 17) + "]"), "stop", "at most 16"),
    (C, _body('"stop": ["ok", "\\ud800"]'), "stop.1", "Unicode"),
    (C, _body("", prompt='"hi \\ud800 there"').replace(", }", "}"), "prompt", "not valid Unicode"),
    (C, _body("", prompt='["ok", "\\udfff"]').replace(", }", "}"), "prompt.1", "not valid Unicode"),
    (CHAT, _chat("", content='"hi \\ud800"').replace(", }", "}"), "messages.0.content",
     "not valid Unicode"),
    (CHAT, _chat("", content='[{"type": "text", "text": "\\udc00"}]').replace(", }", "}"),
     "messages.0.content.0.text", "not valid Unicode"),
    (C, _body('"model": "\\ud800"'), "model", "not valid Unicode"),
    (C, _body('"user": "\\ud800"'), "user", None),
    (C, _body('"session_id": "s1", "session_ttl": 1e10'), "session_ttl", "7 days"),
    (C, _body('"session_id": "s1", "session_ttl": NaN'), "session_ttl", None),
    (C, _body('"session_id": "s1", "session_ttl": Infinity'), "session_ttl", None),
    (CHAT, _chat('"session_id": "s1", "session_ttl": 604801'), "session_ttl", "7 days"),
    (C, _body('"session_id": "\\ud800"'), "session_id", None),
    (C, _body('"cache_salt": "\\ud800"'), "cache_salt", None),
    # Scheduling (issue 25): priority, tenant and latency targets.
    (C, _body('"priority": 1.5'), "priority", None),
    (C, _body('"priority": true'), "priority", "boolean"),
    (C, _body('"priority": 99999999999999999999999'), "priority", None),
    (CHAT, _chat('"priority": 11'), None, "from -10 to 10"),
    (C, _body('"priority": "high"'), "priority", None),
    (C, _body('"tenant": "' + "t" * 100_000 + '"'), "tenant", "at most 256"),
    (C, _body('"tenant": "\\ud800"'), "tenant", "Unicode"),
    (C, _body('"tenant": 7'), "tenant", None),
    (C, _body('"ttft_slo_ms": NaN'), "ttft_slo_ms", None),
    (C, _body('"ttft_slo_ms": -5'), "ttft_slo_ms", "> 0"),
    (CHAT, _chat('"ttft_slo_ms": 1e300'), "ttft_slo_ms", "a day"),
    (C, _body('"tpot_slo_ms": Infinity'), "tpot_slo_ms", None),
    (C, _body('"tpot_slo_ms": 0'), "tpot_slo_ms", "> 0"),
    (C, _body('"tpot_slo_ms": "fast"'), "tpot_slo_ms", None),
    # Attention sinks (issue 17): kv_policy, num_sink_tokens, kv_window.
    (C, _body('"kv_policy": "sinks", "kv_window": NaN'), "kv_window", None),
    (C, _body('"kv_policy": "sinks", "kv_window": Infinity'), "kv_window", None),
    (C, _body('"kv_policy": "sinks", "kv_window": -64'), "kv_window", None),
    (C, _body('"kv_policy": "sinks", "kv_window": 99999999999999999999999'), "kv_window", None),
    (C, _body('"kv_policy": "sinks", "kv_window": 64.5'), "kv_window", None),
    (C, _body('"kv_policy": "sinks", "kv_window": "64"'), "kv_window", None),
    (CHAT, _chat('"kv_policy": "sinks", "kv_window": true'), "kv_window", None),
    (C, _body('"kv_policy": "sinks", "kv_window": 8'), "kv_window", "one KV block"),
    (C, _body('"kv_policy": "sinks", "kv_window": 100000'), "kv_window", "context length"),
    (C, _body('"kv_policy": "sinks"'), "kv_window", "required"),
    (C, _body('"kv_policy": "sinks", "kv_window": 64, "num_sink_tokens": 65'), "num_sink_tokens", "exceed"),
    (C, _body('"kv_policy": "sinks", "kv_window": 64, "num_sink_tokens": -1'), "num_sink_tokens", None),
    (C, _body('"kv_policy": "sinks", "kv_window": 64, "num_sink_tokens": NaN'), "num_sink_tokens", None),
    (C, _body('"kv_policy": "rolling", "kv_window": 64'), "kv_policy", None),
    (CHAT, _chat('"kv_policy": 1, "kv_window": 64'), "kv_policy", None),
    (C, _body('"kv_window": 64'), None, "kv_policy 'sinks'"),
    (C, '{"prompt": [' + ", ".join(["[5]"] * 1000) + '], "max_tokens": 1}', None, "sequences"),
    # Structured output and tools (issue 15): every new field gets its poison.
    (CHAT, _chat('"response_format": {"type": "json_schema", "json_schema": {"name": "x", '
                 '"schema": {"type": "number", "maximum": NaN}}}'), "response_format", "NaN"),
    (C, _body('"response_format": {"type": "json_schema", "json_schema": {"name": "x", '
              '"schema": {"type": "integer", "minimum": Infinity}}}'), "response_format", "NaN"),
    (CHAT, _chat('"response_format": {"type": "json_schema", "json_schema": {"name": "\\ud800", '
                 '"schema": {}}}'), "response_format.json_schema.name", None),
    (CHAT, _chat('"response_format": {"type": "json_schema", "json_schema": {"name": "x", '
                 '"schema": ' + "[" * 200 + "]" * 200 + "}}"), "response_format.json_schema.schema", None),
    (CHAT, _chat('"response_format": {"type": "json_schema", "json_schema": {"name": "x", '
                 '"schema": {"enum": ["' + "e" * 200_000 + '"]}}}'), "response_format", "at most 100000"),
    (C, _body('"response_format": {"type": 1e999}'), "response_format", None),
    (C, _body('"response_format": true'), "response_format", None),
    (C, _body('"structured_outputs": {"regex": "\\ud800"}'), "structured_outputs.regex", "Unicode"),
    (C, _body('"structured_outputs": {"choice": [1, 2]}'), "structured_outputs.choice.0", None),
    (C, _body('"structured_outputs": {"json_object": "yes"}'), "structured_outputs.json_object", "boolean"),
    (C, _body('"structured_outputs": {"json": {"maximum": NaN}}'), "structured_outputs", "NaN"),
    (C, _body('"structured_outputs": {"grammar": "' + "g" * 200_000 + '"}'), "structured_outputs",
     "at most 100000"),
    (C, _body('"structured_outputs": [' + "[" * 200 + "]" * 200 + "]"), "structured_outputs", None),
    (C, _body('"guided_choice": [' + ", ".join(['"c"'] * 5000) + "]"), "guided_choice", "at most 1024"),
    (C, _body('"guided_regex": 12'), "guided_regex", None),
    (C, _body('"guided_json": "{\\"a\\": NaN}"'), "guided_json", None),
    (C, _body('"guided_grammar": "x", "guided_regex": "y"'), "guided_grammar", "at most one"),
    (CHAT, _chat('"tools": [{"type": "function", "function": {"name": "f", "parameters": '
                 '{"x": NaN}}}]'), "tools.0.function.parameters", "NaN"),
    (CHAT, _chat('"tools": [{"type": "function", "function": {"name": "f", "parameters": '
                 '{"x": "' + "p" * 200_000 + '"}}}]'), "tools.0.function.parameters", "at most"),
    (CHAT, _chat('"tools": [{"type": "function", "function": {"name": "f", "parameters": '
                 '{"\\ud800": 1}}}]'), "tools.0.function.parameters", "Unicode"),
    (CHAT, _chat('"tools": [{"type": "function", "function": {"name": "f", "parameters": '
                 + "[" * 200 + "]" * 200 + "}}]"), "tools.0.function.parameters", None),
    (CHAT, _chat('"tools": [' + ", ".join(['{"type": "function", "function": {"name": "f' + str(i) + '"}}'
                                          for i in range(5000)]) + "]"), "tools", "at most 128"),
    (CHAT, _chat('"tools": [{"type": "function", "function": {"name": "' + "n" * 100_000 + '"}}]'),
     "tools.0.function.name", None),
    (CHAT, _chat('"tools": [{"type": "function", "function": {"name": "f", "description": "'
                 + "d" * 100_000 + '"}}]'), "tools.0.function.description", None),
    (CHAT, _chat('"tools": "all"'), "tools", None),
    (CHAT, _chat('"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": 1e999'),
     "tool_choice", None),
    (CHAT, _chat('"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": '
                 '{"type": "function", "function": {"name": "' + "g" * 100_000 + '"}}'),
     "tool_choice", "not in tools"),
    (CHAT, _chat('"tool_choice": "required"'), "tool_choice", "needs tools"),
    (CHAT, _chat('"tools": [{"type": "function", "function": {"name": "f"}}], '
                 '"parallel_tool_calls": 1'), "parallel_tool_calls", "boolean"),
    (CHAT, '{"messages": [{"role": "tool", "content": "x"}], "max_tokens": 2}', "messages.0",
     "tool_call_id"),
    (CHAT, '{"messages": [{"role": "assistant", "tool_calls": [{"id": "\\ud800", "type": "function", '
           '"function": {"name": "f", "arguments": "{}"}}]}], "max_tokens": 2}',
     "messages.0.tool_calls.0.id", "Unicode"),
    (CHAT, '{"messages": [{"role": "assistant", "tool_calls": [' + ", ".join(
        ['{"id": "c", "function": {"name": "f", "arguments": "{}"}}'] * 1000) + ']}], "max_tokens": 2}',
     "messages.0.tool_calls", "at most 128"),
    ("/tokenize", '{"prompt": "\\ud800"}', "prompt", "not valid Unicode"),
    ("/tokenize", '{"prompt": "hi", "add_special_tokens": "yes"}', "add_special_tokens", None),
    ("/detokenize", '{"tokens": [18446744073709551616]}', "tokens", None),
    ("/detokenize", '{"tokens": [true]}', "tokens.0", None),
]


@pytest.mark.parametrize(("route", "raw", "param", "words"), POISON,
                         ids=[f"{i}-{p[0]}-{p[2]}" for i, p in enumerate(POISON)])
def test_poison_is_refused_and_the_victim_is_untouched(server, expected, route, raw, param, words):
    r = with_victim(server, expected, lambda: post_raw(server, route, raw))
    error = assert_openai_error(r, 400, param, words)
    assert error["type"] == "invalid_request_error"


LEGITIMATE = [
    _body('"temperature": 100, "seed": 0'),
    _body('"seed": 9223372036854775807, "n": 2, "temperature": 1'),
    _body('"repetition_penalty": 100, "temperature": 0'),
    _body('"stop": ["' + "y" * 256 + '"], "stop_token_ids": [0]'),
    _body('"session_id": "poison-ok", "session_ttl": 604800'),
    _body('"top_k": 1000000000000000000000000000000, "temperature": 1'),
    _body('"priority": -10, "tenant": "t", "ttft_slo_ms": 86400000, "tpot_slo_ms": 0.001'),
    _body('"kv_policy": "sinks", "kv_window": 16, "num_sink_tokens": 0'),
    _body('"kv_policy": "full"'),
    _body('"user": "' + "u" * 10_000 + '", "tenant": ""'),  # a long user names a tenant, cut
]


@pytest.mark.parametrize("raw", LEGITIMATE, ids=[str(i) for i in range(len(LEGITIMATE))])
def test_edge_values_within_the_limits_are_served(server, expected, raw):
    r = with_victim(server, expected, lambda: post_raw(server, C, raw))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")
    httpx.delete(f"{server.url}/v1/sessions/poison-ok", timeout=10)


def test_a_full_body_of_huge_stop_strings_is_refused_at_once(server, expected):
    """80 stop strings of 100,000 characters (an 8 MiB body) once held the engine for
    seconds; now the body is a 400 long before any engine work."""
    stops = ", ".join(['"' + "z" * 100_000 + '"'] * 80)
    raw = _body('"stop": [' + stops + "]")
    assert len(raw) < 8 * 1024 * 1024

    def poison() -> tuple[httpx.Response, float]:
        start = time.monotonic()
        return post_raw(server, C, raw), time.monotonic() - start

    r, elapsed = with_victim(server, expected, poison)
    assert_openai_error(r, 400, "stop")
    assert elapsed < 30  # a guard against holding the server, not a speed measure (2-3 s when quiet)


def test_sessions_rest_refuses_poison(server, expected):
    def poison() -> list[httpx.Response]:
        out = [
            post_raw(server, "/v1/sessions", '{"session_id": "\\ud800"}'),
            post_raw(server, "/v1/sessions", '{"cache_salt": NaN}'),
        ]
        # "." and ".." cannot be named in a URL (clients resolve them away).
        out += [post_raw(server, "/v1/sessions", '{"session_id": "."}'),
                post_raw(server, "/v1/sessions", '{"session_id": ".."}')]
        r = post_raw(server, "/v1/sessions", '{"session_id": "poison-rest"}')
        assert r.status_code == 200, r.text
        base = "/v1/sessions/poison-rest"
        out += [
            post_raw(server, f"{base}/input", '{"text": "\\ud800"}'),
            post_raw(server, f"{base}/input", '{"text": "ok", "close": "yes"}'),
            post_raw(server, f"{base}/input", '{"tokens": [18446744073709551616]}'),
        ]
        assert post_raw(server, f"{base}/input", '{"text": "Once upon a time"}').status_code == 200
        for fields in ('"temperature": NaN', '"seed": 1180591620717411303424', '"n": 1000',
                       '"stop_token_ids": [1000000000], "stream": true', '"stream": "yes"',
                       '"repetition_penalty": Infinity', '"stop": "' + "x" * 100_000 + '"',
                       '"suffix": "\\ud800"', '"echo": 1'):
            out.append(post_raw(server, f"{base}/generate", '{"max_tokens": 2, ' + fields + "}"))
        ok = post_raw(server, f"{base}/generate", '{"max_tokens": 2, "temperature": 0}')
        assert ok.status_code == 200, ok.text
        assert httpx.delete(f"{server.url}{base}", timeout=10).json()["deleted"] is True
        return out

    for r in with_victim(server, expected, poison):
        assert_openai_error(r, 400)


def test_websocket_refuses_poison_and_keeps_the_socket(server, expected):
    url = server.url.replace("http://", "ws://") + "/v1/stream"

    def poison() -> list[dict]:
        errors = []
        with connect(url) as ws:
            ws.send('{"type": "append", "text": "Hello there"}')
            for raw in ('{"type": "generate", "max_tokens": 2, "temperature": NaN}',
                        '{"type": "generate", "max_tokens": 2, "seed": 1180591620717411303424}',
                        '{"type": "generate", "max_tokens": 2, "n": 1000}',
                        '{"type": "generate", "max_tokens": 2, "stop_token_ids": [1000000000]}',
                        '{"type": "generate", "max_tokens": 2, "echo": "yes"}',
                        '{"type": "append", "text": "\\ud800"}'):
                ws.send(raw)
                while True:
                    event = json.loads(ws.recv(timeout=30))
                    if event["type"] == "error":
                        errors.append(event)
                        break
            ws.send('{"type": "generate", "id": "ok", "max_tokens": 2, "temperature": 0}')
            while True:
                event = json.loads(ws.recv(timeout=30))
                assert event["type"] != "error", event
                if event["type"] == "done":
                    break
        return errors

    errors = with_victim(server, expected, poison)
    assert [e["status"] for e in errors] == [400] * 6
    assert [e["param"] for e in errors] == ["temperature", "seed", "n", "stop_token_ids", "echo",
                                            "text"]


HUGE_LISTS = [
    # (route, raw body of several MB, param): refused from their length, before any work
    (C, '{"prompt": [' + ",".join(["[5]"] * 2_000_000) + '], "max_tokens": 1}', "prompt"),
    (C, '{"prompt": [' + ",".join(['"a"'] * 1_000_000) + '], "max_tokens": 1}', "prompt"),
    (C, '{"prompt": [' + ",".join(['"a"'] * 2049) + '], "max_tokens": 1}', "prompt"),
    (CHAT, '{"messages": [' + ",".join(['{"role": "user"}'] * 400_000) + '], "max_tokens": 1}',
     "messages"),
    (C, '{"prompt": "hi", "stop": [' + ",".join(['"s"'] * 1_000_000) + "]}", "stop"),
    (C, '{"prompt": "hi", "stop_token_ids": [' + ",".join(["5"] * 1_000_000) + "]}",
     "stop_token_ids"),
]


@pytest.mark.parametrize(("route", "raw", "param"), HUGE_LISTS,
                         ids=[f"{i}-{p[0]}-{p[2]}" for i, p in enumerate(HUGE_LISTS)])
def test_huge_lists_are_refused_at_once(server, expected, route, raw, param):
    """Two million one-token prompts once took the event loop for seconds (pydantic tried
    every shape of ``prompt`` and reported millions of errors); 400,000 messages went
    through the chat template on the event loop."""
    assert len(raw) < 8 * 1024 * 1024

    def poison() -> tuple[httpx.Response, float]:
        start = time.monotonic()
        return post_raw(server, route, raw), time.monotonic() - start

    r, elapsed = with_victim(server, expected, poison)
    error = assert_openai_error(r, 400, param)
    assert "at most" in error["message"]
    assert elapsed < 30  # a guard against holding the server, not a speed measure (2-3 s when quiet)
