"""kv_policy "sinks" over HTTP: the completions/chat fields, the ``/v1/sessions`` and
``/v1/stream`` open fields, the metrics, and a 400 naming the field for every malformed
value (the server goes on serving)."""

from __future__ import annotations

import json
import math

import httpx
import pytest
from server_utils import scrape, serve, start_engine, stop_engine, wait_until
from websockets.sync.client import connect

GREEDY = {"temperature": 0, "max_tokens": 8, "ignore_eos": True}
SINKS = {"kv_policy": "sinks", "kv_window": 32}


@pytest.fixture(scope="module")
def engine(llama_dir):
    engine = start_engine(llama_dir, max_num_batched_tokens=48)  # max_model_len 256
    yield engine
    stop_engine(engine)


@pytest.fixture(scope="module")
def server(engine):
    with serve(engine) as srv:
        yield srv


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", content=json.dumps(body, allow_nan=True),
                      headers={"Content-Type": "application/json"}, timeout=60)


def _error(r: httpx.Response, param: str | None) -> None:
    assert 400 <= r.status_code < 500, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error


def test_completions_with_sinks(server):
    prompt = list(range(5, 305))  # past the 256-token context
    r = _post(server, "/v1/completions", {"prompt": prompt, **GREEDY})
    _error(r, "prompt")
    r = _post(server, "/v1/completions", {"prompt": prompt, **GREEDY, **SINKS})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 8
    # A window wider than the sequence is full attention.
    short = {"prompt": "the quick brown fox", **GREEDY}
    full = _post(server, "/v1/completions", short).json()["choices"][0]["text"]
    wide = _post(server, "/v1/completions", {**short, "kv_policy": "sinks", "kv_window": 128}).json()
    assert wide["choices"][0]["text"] == full
    chat = _post(server, "/v1/chat/completions",
                 {"messages": [{"role": "user", "content": "hi"}], **GREEDY, **SINKS, "num_sink_tokens": 2})
    assert chat.status_code == 200, chat.text
    assert scrape(server.url)["livelm_kv_evicted_tokens_total"] > 0


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"kv_policy": "bogus", "kv_window": 32}, "kv_policy"),
        ({"kv_policy": 5, "kv_window": 32}, "kv_policy"),
        ({"kv_policy": "sinks"}, "kv_window"),
        ({"kv_policy": "sinks", "kv_window": math.nan}, None),  # not JSON: invalid_json
        ({"kv_policy": "sinks", "kv_window": -32}, "kv_window"),
        ({"kv_policy": "sinks", "kv_window": 10**15}, "kv_window"),
        ({"kv_policy": "sinks", "kv_window": 10**40}, "kv_window"),
        ({"kv_policy": "sinks", "kv_window": "32"}, "kv_window"),
        ({"kv_policy": "sinks", "kv_window": True}, "kv_window"),
        ({"kv_policy": "sinks", "kv_window": 32.5}, "kv_window"),
        ({"kv_policy": "sinks", "kv_window": 8}, "kv_window"),  # below one block
        ({"kv_policy": "sinks", "kv_window": 1000}, "kv_window"),  # above the context
        ({"kv_policy": "sinks", "kv_window": 32, "num_sink_tokens": 40}, "num_sink_tokens"),
        ({"kv_policy": "sinks", "kv_window": 32, "num_sink_tokens": -1}, "num_sink_tokens"),
        ({"kv_policy": "sinks", "kv_window": 32, "num_sink_tokens": [4]}, "num_sink_tokens"),
        ({"kv_window": 32}, None),
        ({"kv_policy": "full", "kv_window": 32}, "kv_window"),
    ],
)
def test_malformed_fields_get_a_400_and_others_are_served(server, fields, param):
    for path, body in (("/v1/completions", {"prompt": "hello", **GREEDY}),
                       ("/v1/sessions", {})):
        _error(_post(server, path, {**body, **fields}), param)
    ok = _post(server, "/v1/completions", {"prompt": "hello", **GREEDY})
    assert ok.status_code == 200


def test_rest_session_streams_past_the_context(server, engine):
    url = server.url
    r = _post(server, "/v1/sessions", {"session_id": "endless", **SINKS})
    assert r.status_code == 200, r.text
    try:
        for _ in range(12):  # ~600 tokens into a 256-token context
            r = _post(server, "/v1/sessions/endless/input", {"tokens": list(range(5, 55))})
            assert r.status_code == 200, r.text
        assert wait_until(lambda: httpx.get(f"{url}/v1/sessions/endless").json()["num_computed_tokens"] == 600,
                          timeout=60)
        held = engine.stats().num_total_blocks - engine.stats().num_free_blocks
        assert held <= 1 + (3 * 32 + 32) // 16 + 2
        r = _post(server, "/v1/sessions/endless/input", {"tokens": list(range(5, 100)), "mode": "replace"})
        _error(r, None)
        assert "kv_window" in r.json()["error"]["message"]
        _error(_post(server, "/v1/sessions/endless/generate", {**GREEDY, "kv_window": 64}), "kv_window")
        reply = _post(server, "/v1/sessions/endless/generate", GREEDY)
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 8
    finally:
        httpx.delete(f"{url}/v1/sessions/endless")


def test_websocket_open_with_sinks(server):
    ws_url = server.url.replace("http://", "ws://") + "/v1/stream"
    with connect(ws_url) as ws:
        ws.send(json.dumps({"type": "open", "kv_policy": "sinks", "kv_window": 4}))
        event = json.loads(ws.recv(timeout=30))
        assert event["type"] == "error" and event["param"] == "kv_window" and event["status"] == 400
        ws.send(json.dumps({"type": "open", **SINKS}))
        event = json.loads(ws.recv(timeout=30))
        assert event["type"] == "session"
        ws.send(json.dumps({"type": "append", "tokens": list(range(5, 305))}))
        ws.send(json.dumps({"type": "generate", "id": "g", **GREEDY}))
        while True:
            event = json.loads(ws.recv(timeout=60))
            assert event["type"] != "error", event
            if event["type"] == "done":
                break
        ws.send(json.dumps({"type": "close"}))
