"""Graceful shutdown of a real ``livelm serve`` process: on SIGTERM/SIGINT new requests get
503 at once, in-flight ones may finish within ``--drain-timeout``, the rest end with an
OpenAI-style error (JSON body, or a final SSE error event then ``[DONE]``), and the process
exits 0 promptly, with no traceback and no plain-text 500 (issue 23, item 6)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from server_utils import wait_until
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

DRAIN = 2.0  # --drain-timeout of the tests that cut requests off
MARGIN = 10.0  # generous: the measured exit is printed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_process(model_dir, log_path, *extra: str) -> tuple[subprocess.Popen, str]:  # noqa: ANN001
    """``livelm serve`` in a child process (its log goes to ``log_path``), once healthy."""
    port = _free_port()
    cmd = [sys.executable, "-m", "livelm.entrypoints.serve_cli", "--model", str(model_dir),
           "--port", str(port), "--max-model-len", "16384", "--kv-cache-gib", "0.25", *extra]
    with open(log_path, "w") as log:  # a file, not a pipe: a full pipe would block the server
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "LIVELM_API_KEY": ""})
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return proc.poll() is not None

    assert wait_until(up, timeout=120, interval=0.1)
    assert proc.poll() is None, log_path.read_text()
    return proc, url


def _request_records(log_path) -> list[dict]:  # noqa: ANN001
    lines = log_path.read_text().splitlines()
    return [json.loads(line[line.index("{"):]) for line in lines if '"event": "request"' in line]


def _assert_clean_log(log_path) -> None:  # noqa: ANN001
    text = log_path.read_text()
    assert "Traceback" not in text, text
    assert "Internal Server Error" not in text, text
    assert "server stopped" in text, text


def _stream_in_thread(url: str, path: str, body: dict) -> tuple[threading.Thread, dict]:
    """POST ``body`` (a streamed request) from a thread; its SSE lines land in the result."""
    result: dict = {"events": [], "started": threading.Event()}

    def run() -> None:
        try:
            with httpx.stream("POST", f"{url}{path}", json=body, timeout=60) as r:
                result["status"] = r.status_code
                for line in r.iter_lines():
                    if line:
                        result["events"].append(line)
                        result["started"].set()
        except httpx.HTTPError as exc:
            result["error"] = exc
        result["started"].set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def _completion(max_tokens: int, **extra) -> dict:
    return {"prompt": "Hello", "max_tokens": max_tokens, "ignore_eos": True, "stream": True, **extra}


def _wait_for_exit(proc: subprocess.Popen, signalled_at: float, log_path) -> float:  # noqa: ANN001
    assert proc.wait(60) == 0, log_path.read_text()
    return time.monotonic() - signalled_at


def _assert_refused(url: str) -> None:
    """A request right after the signal: 503 with an OpenAI body, or no connection at all."""
    try:
        r = httpx.post(f"{url}/v1/completions", json=_completion(4, stream=False), timeout=10)
    except httpx.TransportError:
        return  # the listener is already closed
    assert r.status_code == 503, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.headers.get("connection") == "close"
    error = r.json()["error"]
    assert error["type"] == "service_unavailable" and error["code"] == "server_shutdown"
    assert error["message"] == "the server is shutting down"


def _assert_ended_with_shutdown_error(result: dict) -> None:
    events = result["events"]
    assert result.get("status") == 200 and "error" not in result, result
    assert events[-1] == "data: [DONE]", events[-3:]
    error = json.loads(events[-2][len("data: "):])["error"]
    assert error["type"] == "service_unavailable" and error["code"] == "server_shutdown", error
    assert "shutting down" in error["message"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_with_8_streams_in_flight_ends_them_with_an_error_and_exits(llama_dir, tmp_path, sig):
    """8 long streams (completions, chat, an input session over SSE), a long non-streamed
    request and a WebSocket reply are in flight; none can finish within the drain."""
    log = tmp_path / "server.log"
    proc, url = _start_process(llama_dir, log, "--drain-timeout", str(DRAIN))
    stack = contextlib.ExitStack()
    try:
        sid = httpx.post(f"{url}/v1/sessions", json={}, timeout=10).json()["session_id"]
        httpx.post(f"{url}/v1/sessions/{sid}/input", json={"text": "Once upon a time"}, timeout=10)
        streams = [_stream_in_thread(url, "/v1/completions", _completion(16000)) for _ in range(6)]
        streams.append(_stream_in_thread(url, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "Tell me a long story"}],
            "max_tokens": 16000, "ignore_eos": True, "stream": True}))
        streams.append(_stream_in_thread(url, f"/v1/sessions/{sid}/generate", _completion(16000)))
        whole: dict = {}

        def non_streamed() -> None:
            whole["r"] = httpx.post(f"{url}/v1/completions", json=_completion(16000, stream=False),
                                    timeout=60)

        whole_thread = threading.Thread(target=non_streamed, daemon=True)
        whole_thread.start()
        ws = stack.enter_context(connect(url.replace("http://", "ws://") + "/v1/stream"))
        ws.send(json.dumps({"type": "append", "text": "A socket session"}))
        ws.send(json.dumps({"type": "generate", "id": "w", "max_tokens": 16000, "ignore_eos": True}))
        ws_events: list[dict] = []
        while not any(e["type"] == "delta" for e in ws_events):
            ws_events.append(json.loads(ws.recv(timeout=30)))
        for _, result in streams:
            assert result["started"].wait(30)
        time.sleep(0.3)  # let the non-streamed one reach the engine too

        proc.send_signal(sig)
        signalled_at = time.monotonic()
        _assert_refused(url)
        elapsed = _wait_for_exit(proc, signalled_at, log)
        print(f"\n{sig.name}: exited {elapsed:.2f}s after the signal (drain timeout {DRAIN}s)")
        assert DRAIN - 0.5 <= elapsed < DRAIN + MARGIN

        for thread, result in streams:
            thread.join(10)
            _assert_ended_with_shutdown_error(result)
        whole_thread.join(10)
        r = whole["r"]
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutdown", r.text
        # The socket: its reply is aborted, then the session closes with an error event.
        try:
            while True:
                ws_events.append(json.loads(ws.recv(timeout=10)))
        except ConnectionClosed:  # closed by the server: the end of its events
            pass
        kinds = [e["type"] for e in ws_events]
        done = next(e for e in ws_events if e["type"] == "done")
        assert done["finish_reason"] == "abort"
        assert kinds.index("error") > kinds.index("done"), kinds
        assert next(e for e in ws_events if e["type"] == "error")["code"] == "session_closed"

        records = _request_records(log)
        assert len(records) == 10, records
        assert all(r["finish_reason"] == "abort" for r in records), records
        # 503 for the HTTP ones; the WebSocket reply's record says 499 (aborted).
        assert sorted(r["status"] for r in records) == [499] + [503] * 9, records
        _assert_clean_log(log)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health", timeout=2)
    finally:
        stack.close()
        if proc.poll() is None:
            proc.kill()


def test_requests_that_finish_within_the_drain_complete_normally(llama_dir, tmp_path):
    """Short requests in flight at SIGTERM run to their end; the process exits as soon as
    they are done, well before the drain timeout."""
    log = tmp_path / "server.log"
    drain = 30.0
    proc, url = _start_process(llama_dir, log, "--drain-timeout", str(drain))
    try:
        streams = [_stream_in_thread(url, "/v1/completions", _completion(96)) for _ in range(4)]
        whole: dict = {}

        def non_streamed() -> None:
            whole["r"] = httpx.post(f"{url}/v1/completions", json=_completion(96, stream=False),
                                    timeout=60)

        whole_thread = threading.Thread(target=non_streamed, daemon=True)
        whole_thread.start()
        for _, result in streams:
            assert result["started"].wait(30)
        at_signal = [len(result["events"]) for _, result in streams]
        proc.send_signal(signal.SIGTERM)
        signalled_at = time.monotonic()
        _assert_refused(url)
        elapsed = _wait_for_exit(proc, signalled_at, log)
        print(f"\nSIGTERM with short requests: exited {elapsed:.2f}s after the signal")
        assert elapsed < 10.0  # not the 30 s drain timeout: nothing was left to wait for

        assert any(len(r["events"]) > n for (_, r), n in zip(streams, at_signal, strict=True))
        for thread, result in streams:
            thread.join(10)
            assert result["events"][-1] == "data: [DONE]", result["events"][-3:]
            assert not any('"error"' in e for e in result["events"])
        whole_thread.join(10)
        assert whole["r"].status_code == 200
        assert whole["r"].json()["choices"][0]["finish_reason"] == "length"
        records = _request_records(log)
        assert [r["finish_reason"] for r in records] == ["length"] * 5, records
        assert all(r["completion_tokens"] == 96 for r in records)
        _assert_clean_log(log)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_drain_timeout_flag_and_config():
    from livelm.entrypoints.cli import build_parser
    from livelm.entrypoints.openai import ServerConfig
    from livelm.entrypoints.openai.api_server import server_config_from_args

    parser = build_parser()
    assert server_config_from_args(parser.parse_args(["serve"])).drain_timeout_s == 5.0
    args = parser.parse_args(["serve", "--drain-timeout", "1.5"])
    assert server_config_from_args(args).drain_timeout_s == 1.5
    args = parser.parse_args(["serve", "--shutdown-timeout", "7"])  # the old name
    assert server_config_from_args(args).drain_timeout_s == 7.0
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--drain-timeout", "-1"])
    with pytest.raises(ValueError, match="drain_timeout_s"):
        ServerConfig(drain_timeout_s=-0.5)


def test_second_signal_ends_the_drain_at_once(llama_dir, tmp_path):
    """With a long drain timeout, a second SIGTERM cuts the drain short: the streams still
    end with the error event and the process exits 0."""
    log = tmp_path / "server.log"
    proc, url = _start_process(llama_dir, log, "--drain-timeout", "60")
    try:
        streams = [_stream_in_thread(url, "/v1/completions", _completion(16000)) for _ in range(2)]
        for _, result in streams:
            assert result["started"].wait(30)
        proc.send_signal(signal.SIGTERM)
        signalled_at = time.monotonic()
        _assert_refused(url)
        time.sleep(0.5)
        assert proc.poll() is None  # still draining
        proc.send_signal(signal.SIGTERM)
        elapsed = _wait_for_exit(proc, signalled_at, log)
        print(f"\ntwo SIGTERMs: exited {elapsed:.2f}s after the first")
        assert elapsed < 15.0
        for thread, result in streams:
            thread.join(10)
            _assert_ended_with_shutdown_error(result)
        _assert_clean_log(log)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_draining_app_refuses_http_and_websocket_with_openai_errors(llama_dir):
    """In process: once the drain began, every route and the WebSocket handshake get the
    503; the engine keeps serving (the server, not the app, decides when to stop it)."""
    from server_utils import serve, start_engine, stop_engine
    from websockets.exceptions import InvalidStatus

    engine = start_engine(llama_dir)
    try:
        with serve(engine) as srv:
            srv.app.state.drain.begin()
            for method, path in (("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                                 ("GET", "/v1/models"), ("POST", "/v1/sessions")):
                r = httpx.request(method, f"{srv.url}{path}", json={"prompt": "x"}, timeout=10)
                assert r.status_code == 503, (path, r.text)
                assert r.headers["connection"] == "close"
                assert r.json()["error"]["code"] == "server_shutdown"
            with pytest.raises(InvalidStatus) as denied:
                connect(srv.url.replace("http://", "ws://") + "/v1/stream")
            assert denied.value.response.status_code == 503
            assert json.loads(denied.value.response.body)["error"]["type"] == "service_unavailable"
            assert not engine.stopping
    finally:
        stop_engine(engine)
