"""Streaming input over HTTP: the ``/v1/stream`` WebSocket and the ``/v1/sessions`` REST/SSE
routes, driven against a real uvicorn server on the tiny Llama model. Greedy replies must
equal ``/v1/completions`` on the same text at the same point; limits, auth and dropped
sockets must behave (the autouse leak check proves the KV comes back)."""

from __future__ import annotations

import base64
import json
import socket
import time

import httpx
import pytest
from server_utils import scrape, serve, sse_events, start_engine, stop_engine, wait_until
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

GREEDY = {"temperature": 0, "max_tokens": 8, "ignore_eos": True}
KEY = "sk-stream-key"


@pytest.fixture(scope="module")
def engine(llama_dir):
    # A small token budget: streamed input, replies and other requests share steps.
    engine = start_engine(llama_dir, max_num_batched_tokens=48)
    yield engine
    stop_engine(engine)


@pytest.fixture(scope="module")
def server(engine):
    with serve(engine, max_body_bytes=16384) as srv:
        yield srv


@pytest.fixture(scope="module")
def limited_engine(llama_dir):
    """Two sessions at most, 8 pending tokens, a 1.5 s idle timeout, a tiny step budget."""
    engine = start_engine(llama_dir, max_input_streams=2, max_stream_pending_tokens=8,
                          stream_idle_timeout_s=1.5, max_num_batched_tokens=16)
    yield engine
    stop_engine(engine)


def ws_url(server, query: str = "") -> str:
    return server.url.replace("http://", "ws://") + "/v1/stream" + query


def completion(server, prompt: str, headers: dict | None = None, **fields) -> dict:
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": prompt, **GREEDY, **fields},
                   headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def counts(usage: dict) -> dict:
    """The token counts of a usage (cached tokens depend on what the cache held: a reply
    forks its stream's KV, a one-shot request finds the prefix cache's)."""
    return {k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


def send(ws, **event) -> None:
    ws.send(json.dumps(event))


def recv(ws, timeout: float = 60) -> dict:
    return json.loads(ws.recv(timeout=timeout))


def next_error(ws) -> dict:
    """The next error event (state events from prefill progress may come first)."""
    return until(ws, lambda e: e["type"] == "error")[0]


def until(ws, predicate, timeout: float = 60) -> tuple[dict, list[dict]]:
    """Read events until ``predicate(event)``; returns it and every event read."""
    seen = []
    deadline = time.monotonic() + timeout
    while True:
        event = recv(ws, max(deadline - time.monotonic(), 0.01))
        seen.append(event)
        if predicate(event):
            return event, seen


def collect_replies(ws, ids: set[str], timeout: float = 60) -> tuple[dict, list[dict]]:
    """Read until every reply in ``ids`` is done: ({id: {"text", "token_ids", "done"}}, events)."""
    replies = {i: {"text": "", "token_ids": [], "done": None} for i in ids}
    pending = set(ids)
    events = []
    deadline = time.monotonic() + timeout
    while pending:
        event = recv(ws, max(deadline - time.monotonic(), 0.01))
        events.append(event)
        if event["type"] == "delta":
            replies[event["id"]]["text"] += event["text"]
            replies[event["id"]]["token_ids"] += event["token_ids"]
        elif event["type"] == "done":
            replies[event["id"]]["done"] = event
            pending.discard(event["id"])
        elif event["type"] == "error":
            raise AssertionError(f"unexpected error event {event}")
    return replies, events


# ------------------------------------------------------------------------- WebSocket


def test_websocket_speak_while_reading_equals_completions(server, engine):
    first = "The quick brown fox jumps over the lazy "
    with connect(ws_url(server)) as ws:
        send(ws, type="open", session_id="ws-e2e")
        assert recv(ws) == {"type": "session", "session_id": "ws-e2e"}
        assert recv(ws)["type"] == "state"
        for piece in ("The quick br", "own fox jumps ", "over the lazy "):
            send(ws, type="append", text=piece)
        # Generate before the input is closed, while more input keeps arriving.
        # Long enough to still be streaming when the other two start, however fast the
        # engine (16 tokens once finished first on a quick host).
        send(ws, type="generate", id="early", **{**GREEDY, "max_tokens": 200})
        # "café" split inside its two-byte "é": raw UTF-8 in binary frames.
        ws.send(b"dog at the caf\xc3")
        ws.send(b"\xa9, ")
        send(ws, type="append", text="très bien")
        send(ws, type="generate", id="with-suffix", suffix=" and then", **GREEDY)
        send(ws, type="close_input")
        send(ws, type="generate", id="final", **GREEDY)
        replies, events = collect_replies(ws, {"early", "with-suffix", "final"})
        # The three replies overlapped: a delta of one came after another had started.
        order = [e["id"] for e in events if e["type"] == "delta"]
        assert order.index("final") < max(i for i, r in enumerate(order) if r == "early") or \
            order.index("with-suffix") < max(i for i, r in enumerate(order) if r == "early")
        states = [e for e in events if e["type"] == "state"]
        assert states and all(s["session_id"] == "ws-e2e" for s in states)
        assert any(s["input_closed"] for s in states)
        # No more work for the session: all its input has KV, or the reply to the closed
        # input took the rest of the prefill over.
        assert any(s["status"] == "input_closed" for s in states)
        send(ws, type="close")
        with pytest.raises(ConnectionClosed):
            until(ws, lambda e: False, timeout=10)
    full = first + "dog at the café, très bien"
    for reply_id, text in (("early", first), ("with-suffix", full + " and then"), ("final", full)):
        max_tokens = 200 if reply_id == "early" else 8
        ref = completion(server, text, max_tokens=max_tokens)
        reply = replies[reply_id]
        assert reply["text"] == ref["choices"][0]["text"], reply_id
        assert len(reply["token_ids"]) == ref["usage"]["completion_tokens"] == max_tokens
        assert reply["done"]["finish_reason"] == "length"
        assert counts(reply["done"]["usage"]) == counts(ref["usage"]), reply_id
    assert wait_until(lambda: engine.num_input_streams == 0)


def test_websocket_token_input_replace_and_logprobs(server):
    prompt = list(range(10, 40))
    with connect(ws_url(server)) as ws:  # no open event: the first event opens a session
        send(ws, type="append", tokens=prompt[:12])
        session = recv(ws)
        assert session["type"] == "session" and session["session_id"].startswith("sess-")
        send(ws, type="append", tokens=[1, 2, 3])
        send(ws, type="replace", tokens=prompt)  # update mode: keeps the first 12 tokens
        send(ws, type="generate", id="r", logprobs=2, **GREEDY)
        replies, events = collect_replies(ws, {"r"})
        deltas = [e for e in events if e["type"] == "delta"]
        assert all(len(d["logprobs"]["tokens"]) == len(d["token_ids"]) for d in deltas)
        assert all(len(top) <= 2 for d in deltas for top in d["logprobs"]["top_logprobs"])
    ref = completion(server, prompt)
    assert replies["r"]["text"] == ref["choices"][0]["text"]
    assert replies["r"]["done"]["usage"]["prompt_tokens"] == len(prompt)


def test_websocket_cancel_one_and_all(server):
    with connect(ws_url(server)) as ws:
        send(ws, type="append", text="Count to a thousand slowly")
        long = {**GREEDY, "max_tokens": 200}
        send(ws, type="generate", id="a", **long)
        send(ws, type="generate", id="b", **GREEDY)
        until(ws, lambda e: e["type"] == "delta" and e["id"] == "a")
        send(ws, type="cancel", id="a")
        replies, _ = collect_replies(ws, {"a", "b"})
        assert replies["a"]["done"]["finish_reason"] == "abort"
        assert len(replies["a"]["token_ids"]) < 200
        assert replies["b"]["done"]["finish_reason"] == "length"
        # Cancel without an id ends every reply in flight, even one not started yet.
        send(ws, type="generate", id="c", **long)
        send(ws, type="generate", id="d", **long)
        send(ws, type="cancel")
        replies, _ = collect_replies(ws, {"c", "d"})
        assert {r["done"]["finish_reason"] for r in replies.values()} == {"abort"}
        send(ws, type="cancel", id="nope")
        error, _ = until(ws, lambda e: e["type"] == "error")
        assert error["code"] == "reply_not_found" and error["id"] == "nope"


def test_websocket_errors_keep_the_socket_open(server):
    with connect(ws_url(server)) as ws:
        ws.send("{not json")
        assert recv(ws)["code"] == "invalid_json"
        ws.send("[1, 2]")
        assert recv(ws)["code"] == "invalid_event"
        send(ws, type="shout")
        assert recv(ws)["code"] == "unknown_event"
        ws.send(json.dumps({"type": "append", "text": "x" * 20000}))  # over max_body_bytes
        error = recv(ws)
        assert error["code"] == "message_too_large" and error["status"] == 413
        send(ws, type="generate", id="g", **GREEDY)  # opens the session, which is empty
        events = [recv(ws) for _ in range(3)]
        assert [e["type"] for e in events] == ["session", "state", "error"]
        assert events[2]["code"] == "empty_input" and events[2]["id"] == "g"
        send(ws, type="append", text="Hello there")
        assert recv(ws)["type"] == "state"
        send(ws, type="append", tokens=[1, 2])  # a text session takes text
        assert next_error(ws)["status"] == 400
        send(ws, type="append", text="a", tokens=[1])
        assert next_error(ws)["code"] is not None
        send(ws, type="generate", temperature=-1)
        assert next_error(ws)["param"] == "temperature"
        send(ws, type="generate", n=2)
        assert next_error(ws)["param"] == "n"
        send(ws, type="generate", max_tokens=10_000)
        assert next_error(ws)["code"] == "context_length_exceeded"
        send(ws, type="open")
        assert next_error(ws)["code"] == "already_open"
        send(ws, type="close_input")
        assert until(ws, lambda e: e["type"] == "state" and e["input_closed"])[0]["input_closed"] is True
        send(ws, type="append", text=" more")
        error, _ = until(ws, lambda e: e["type"] == "error")
        assert error["code"] == "input_closed" and error["status"] == 409
        # Still usable: a reply to the closed input.
        send(ws, type="generate", id="ok", **GREEDY)
        replies, _ = collect_replies(ws, {"ok"})
        assert replies["ok"]["done"]["finish_reason"] == "length"


def test_dropped_websocket_frees_its_kv(server, engine):
    with connect(ws_url(server)) as ws:
        send(ws, type="open", session_id="dropped")
        send(ws, type="append", text="A long context that keeps arriving " * 3)
        send(ws, type="generate", id="a", **{**GREEDY, "max_tokens": 150})
        send(ws, type="generate", id="b", **{**GREEDY, "max_tokens": 150})
        until(ws, lambda e: e["type"] == "delta" or e["type"] == "error")
        assert engine.get_stream("dropped") is not None
        assert engine.stats().num_free_blocks < engine.stats().num_total_blocks
        ws.socket.shutdown(socket.SHUT_RDWR)  # no closing handshake: the client vanishes
    assert wait_until(lambda: engine.get_stream("dropped") is None)
    assert wait_until(lambda: engine.stats().num_running == 0 and engine.stats().num_input_streams == 0)
    stats = engine.stats()
    assert wait_until(lambda: engine.stats().num_free_blocks == stats.num_total_blocks)
    assert wait_until(lambda: scrape(server.url).get("livelm_server_websockets") == 0)
    assert server.app.state.livelm.admission.in_flight == 0


def test_idle_websocket_session_is_closed(limited_engine):
    with serve(limited_engine) as srv, connect(ws_url(srv)) as ws:
        send(ws, type="append", text="Anyone there?")
        error, _ = until(ws, lambda e: e["type"] == "error", timeout=30)
        assert error["code"] == "session_closed" and "idle" in error["message"]
        with pytest.raises(ConnectionClosed):
            until(ws, lambda e: False, timeout=10)
    assert limited_engine.num_input_streams == 0


# ------------------------------------------------------------------------- REST / SSE


def test_sse_session_equals_completions_and_delete_frees(server, engine):
    url = server.url
    r = httpx.post(f"{url}/v1/sessions", json={"session_id": "rest-1"})
    assert r.status_code == 200, r.text
    assert r.json()["session_id"] == "rest-1" and r.json()["status"] == "waiting_for_input"
    pieces = ["Le caf", None, "bien, the quick", " brown fox"]
    for piece in pieces:
        body = ({"bytes": base64.b64encode("é très ".encode()[:1]).decode()} if piece is None
                else {"text": piece})
        r = httpx.post(f"{url}/v1/sessions/rest-1/input", json=body)
        assert r.status_code == 200, r.text
        if piece is None:  # the second byte of "é", then the rest
            rest = "é très ".encode()[1:]
            r = httpx.post(f"{url}/v1/sessions/rest-1/input",
                           json={"bytes": base64.b64encode(rest).decode()})
            assert r.status_code == 200, r.text
    sofar = "Le café très bien, the quick brown fox"

    def generate(**fields) -> tuple[str, list[dict]]:
        with httpx.stream("POST", f"{url}/v1/sessions/rest-1/generate",
                          json={**GREEDY, "stream": True, **fields}, timeout=60) as resp:
            assert resp.status_code == 200
            events = sse_events(resp)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert all(c["object"] == "text_completion" for c in chunks)
        return "".join(c["choices"][0]["text"] for c in chunks if c["choices"]), chunks

    assert generate()[0] == completion(server, sofar)["choices"][0]["text"]
    # Update mode: the input is revised; the common prefix keeps its KV.
    revised = "Le café très bien, the quick red fox jumps"
    r = httpx.post(f"{url}/v1/sessions/rest-1/input", json={"text": revised, "mode": "replace"})
    assert r.status_code == 200 and r.json()["num_input_tokens"] > 0
    r = httpx.post(f"{url}/v1/sessions/rest-1/input", json={"close": True})
    assert r.json()["input_closed"] is True
    assert generate()[0] == completion(server, revised)["choices"][0]["text"]
    whole = httpx.post(f"{url}/v1/sessions/rest-1/generate", json={**GREEDY, "suffix": " over"},
                       timeout=60).json()
    ref = completion(server, revised + " over")
    assert whole["choices"][0]["text"] == ref["choices"][0]["text"]
    assert counts(whole["usage"]) == counts(ref["usage"])
    _, chunks = generate(stream_options={"include_usage": True})  # as on /v1/completions
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8
    assert wait_until(lambda: httpx.get(f"{url}/v1/sessions/rest-1").json()["status"]
                      == "input_closed")
    assert scrape(url)["livelm_input_streams"] == 1
    r = httpx.delete(f"{url}/v1/sessions/rest-1")
    assert r.json() == {"id": "rest-1", "object": "session", "deleted": True}
    assert httpx.get(f"{url}/v1/sessions/rest-1").status_code == 404
    assert wait_until(lambda: engine.stats().num_input_streams == 0)
    assert scrape(url)["livelm_computed_tokens_total"] > 0
    # DELETE still releases pinned multi-turn sessions (none here).
    assert httpx.delete(f"{url}/v1/sessions/rest-1").json()["deleted"] is False


def _error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


def test_rest_errors(server):
    url = server.url
    _error(httpx.get(f"{url}/v1/sessions/ghost"), 404, "session_not_found")
    _error(httpx.post(f"{url}/v1/sessions/ghost/input", json={"text": "x"}), 404)
    _error(httpx.post(f"{url}/v1/sessions/ghost/generate", json={}), 404)
    _error(httpx.post(f"{url}/v1/sessions", json={"session_id": "bad id/"}), 400)
    sid = httpx.post(f"{url}/v1/sessions", json={}).json()["session_id"]
    try:
        _error(httpx.post(f"{url}/v1/sessions", json={"session_id": sid}), 409, "session_exists")
        _error(httpx.post(f"{url}/v1/sessions/{sid}/generate", json={}), 400, "empty_input")
        _error(httpx.post(f"{url}/v1/sessions/{sid}/input", json={}), 400)
        _error(httpx.post(f"{url}/v1/sessions/{sid}/input", json={"text": "a", "tokens": [1]}), 400)
        _error(httpx.post(f"{url}/v1/sessions/{sid}/input", json={"bytes": "***"}), 400)
        _error(httpx.post(f"{url}/v1/sessions/{sid}/input", json={"text": "a", "mode": "insert"}), 400)
        _error(httpx.post(f"{url}/v1/sessions/{sid}/input", content=b"{nope",
                          headers={"Content-Type": "application/json"}), 400, "invalid_json")
        _error(httpx.post(f"{url}/v1/sessions/{sid}/input", json={"text": "x" * 20000}), 413)
        assert httpx.post(f"{url}/v1/sessions/{sid}/input",
                          json={"text": "hello", "close": True}).status_code == 200
        _error(httpx.post(f"{url}/v1/sessions/{sid}/input", json={"text": "more"}), 409,
               "input_closed")
        _error(httpx.post(f"{url}/v1/sessions/{sid}/input", json={"text": "y", "mode": "replace"}),
               409, "input_closed")
        body = {**GREEDY, "session_id": "x"}
        assert _error(httpx.post(f"{url}/v1/sessions/{sid}/generate", json=body), 400)["param"] \
            == "session_id"
        _error(httpx.post(f"{url}/v1/sessions/{sid}/generate", json={"model": "other"}), 404)
        _error(httpx.post(f"{url}/v1/sessions/{sid}/generate", json={"max_tokens": 10_000}), 400,
               "context_length_exceeded")
    finally:
        httpx.delete(f"{url}/v1/sessions/{sid}")


def test_limits_too_many_sessions_and_pending_input(limited_engine):
    with serve(limited_engine) as srv:
        url = srv.url
        ids = [httpx.post(f"{url}/v1/sessions", json={}).json()["session_id"] for _ in range(2)]
        _error(httpx.post(f"{url}/v1/sessions", json={}), 429, "too_many_sessions")
        with connect(ws_url(srv)) as ws:  # the WebSocket meets the same limit
            send(ws, type="append", text="hi")
            assert recv(ws)["code"] == "too_many_sessions"
        feed = f"{url}/v1/sessions/{ids[0]}/input"
        # One piece larger than the pending limit (8 tokens) is refused outright...
        r = httpx.post(feed, json={"tokens": list(range(5, 60))})
        _error(r, 429, "pending_input_limit")
        assert r.headers["Retry-After"] == "1"
        # ...and so is a piece that arrives while earlier ones still wait for prefill (the
        # engine is slowed down so that they do).
        fe = limited_engine._engine
        step = fe.step

        def slow_step():
            time.sleep(0.3)
            return step()

        fe.step = slow_step
        try:
            assert httpx.post(feed, json={"tokens": list(range(5, 13))}).status_code == 200
            _error(httpx.post(feed, json={"tokens": [7, 8, 9, 10]}), 429, "pending_input_limit")
        finally:
            fe.step = step
        # Once prefill catches up, appending works again.
        assert wait_until(lambda: httpx.get(f"{url}/v1/sessions/{ids[0]}").json()["status"]
                          == "waiting_for_input")
        assert httpx.post(feed, json={"tokens": [7, 8, 9, 10]}).status_code == 200
        for sid in ids:
            assert httpx.delete(f"{url}/v1/sessions/{sid}").json()["deleted"] is True
        assert httpx.post(f"{url}/v1/sessions", json={"session_id": "again"}).status_code == 200
        # The idle timeout (1.5 s) closes a forgotten session: then it is unknown.
        assert wait_until(lambda: httpx.get(f"{url}/v1/sessions/again").status_code == 404,
                          timeout=15)


def test_api_key_guards_both_routes(engine):
    auth = {"Authorization": f"Bearer {KEY}"}
    with serve(engine, api_key=KEY) as srv:
        _error(httpx.post(f"{srv.url}/v1/sessions", json={}), 401, "invalid_api_key")
        _error(httpx.get(f"{srv.url}/v1/sessions/x"), 401)
        with pytest.raises(InvalidStatus) as exc:
            connect(ws_url(srv))
        assert exc.value.response.status_code == 401
        with pytest.raises(InvalidStatus):
            connect(ws_url(srv, "?api_key=wrong"))
        r = httpx.post(f"{srv.url}/v1/sessions", json={}, headers=auth)
        assert r.status_code == 200
        assert httpx.delete(f"{srv.url}/v1/sessions/{r.json()['session_id']}", headers=auth).json()["deleted"]
        for ws in (connect(ws_url(srv), additional_headers=auth),
                   connect(ws_url(srv, f"?api_key={KEY}"))):  # browsers: the key in the query
            with ws:
                send(ws, type="append", text="Hello")
                send(ws, type="close_input")
                send(ws, type="generate", id="x", **GREEDY)
                replies, _ = collect_replies(ws, {"x"})
                assert replies["x"]["done"]["finish_reason"] == "length"
        m = scrape(srv.url)
        assert m['livelm_requests_rejected_total{reason="unauthorized"}'] >= 4


def test_cli_flags_reach_the_stream_limits():
    from livelm.entrypoints.cli import build_parser
    from livelm.entrypoints.openai.api_server import engine_kwargs_from_args

    args = build_parser().parse_args(["serve", "--max-input-streams", "3", "--stream-idle-timeout",
                                      "12.5", "--max-stream-pending-tokens", "100"])
    assert engine_kwargs_from_args(args) == {"max_input_streams": 3, "stream_idle_timeout_s": 12.5,
                                             "max_stream_pending_tokens": 100}
