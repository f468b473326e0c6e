"""Kill and disconnect storms against one server on the tiny model: many clients that
leave at random points (before the first byte, mid-stream, by a TCP reset as a killed
process would), WebSocket clients that vanish mid-session and REST clients that abandon
their input sessions. Afterwards the server must answer a victim request exactly as
before the storm, and hold no KV blocks, requests or admission places (issue 23).

The counts and times are bounded (a fixed seed, a few hundred tokens per request) so the
whole file stays well under a minute on two cores.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import struct

import httpx
import pytest
from server_utils import scrape, serve, start_engine, stop_engine, wait_until
from websockets.asyncio.client import connect as ws_connect

SEED = 23
HTTP_CLIENTS = 48
WS_CLIENTS = 8
SESSION_CLIENTS = 8
MAX_TOKENS = 300  # long enough to be cut off at a random point
IDLE_TIMEOUT_S = 1.5  # abandoned input sessions are closed by the engine after this
VICTIM = {"prompt": "The capital of France is", "max_tokens": 24, "temperature": 0}


@pytest.fixture(scope="module")
def engine(llama_dir):
    engine = start_engine(llama_dir, max_model_len=1024, max_num_seqs=64,
                          stream_idle_timeout_s=IDLE_TIMEOUT_S)
    yield engine
    stop_engine(engine)


@pytest.fixture(scope="module")
def server(engine):
    with serve(engine, max_running=64) as srv:
        yield srv


class _Errors(logging.Handler):
    """Error records (and any with a traceback) of the server's loggers."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            self.records.append(record)


@pytest.fixture
def server_errors():
    handler = _Errors()
    loggers = [logging.getLogger(name) for name in ("livelm", "uvicorn.error")]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler.records
    for logger in loggers:
        logger.removeHandler(handler)


def _quiet(url: str) -> bool:
    """Nothing running or admitted, no socket or session open, every KV block free except
    those session pins hold."""
    m = scrape(url)
    return (m["livelm_num_requests_running"] == 0 and m["livelm_num_requests_waiting"] == 0
            and m["livelm_server_sequences_in_flight"] == 0
            and m.get("livelm_server_websockets", 0) == 0
            and m.get("livelm_input_streams", 0) == 0
            and m["livelm_kv_cache_free_blocks"] + m.get("livelm_session_pinned_blocks", 0)
            == m["livelm_kv_cache_total_blocks"])


def _body(rng: random.Random, i: int, route: str) -> dict:
    body = {"max_tokens": rng.randint(MAX_TOKENS // 2, MAX_TOKENS), "ignore_eos": True,
            "temperature": rng.choice([0, 0.8]), "stream": True}
    if "chat" in route:
        body["messages"] = [{"role": "user", "content": f"Story number {i}, please"}]
    else:
        body["prompt"] = f"Client {i} says hello " * rng.randint(1, 6)
    return body


# ----------------------------------------------------------------------- the clients


async def _http_leaver(url: str, rng: random.Random, i: int) -> None:
    """A streamed (or, sometimes, whole) completion or chat that the client abandons after
    a random number of events; some give up before any byte of the response."""
    route = rng.choice(["/v1/completions", "/v1/chat/completions"])
    body = _body(rng, i, route)
    body["stream"] = rng.random() < 0.8
    leave_after = rng.choice([0, 0, 1, 2, 5, 10, 30])
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        if not body["stream"]:
            request = asyncio.ensure_future(http.post(route, json=body))
            await asyncio.sleep(rng.uniform(0.0, 0.5))
            request.cancel()  # a client timeout: the connection is dropped
            await asyncio.gather(request, return_exceptions=True)
            return
        async with http.stream("POST", route, json=body) as r:
            if leave_after == 0:
                return  # headers only: the body is never read
            seen = 0
            async for line in r.aiter_lines():
                seen += bool(line)
                if seen >= leave_after:
                    return  # leaving the block closes the connection mid-stream


async def _raw_killer(host: str, port: int, rng: random.Random, i: int) -> None:
    """A client process killed mid-request: the raw request, a few bytes read (or none,
    or not even the whole request sent), then a TCP reset."""
    body = json.dumps(_body(rng, i, "/v1/completions")).encode()
    request = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    reader, writer = await asyncio.open_connection(host, port)
    mode = rng.choice(["partial", "sent", "read"])
    writer.write(request[: len(request) // 2] if mode == "partial" else request)
    await writer.drain()
    if mode == "read":
        await reader.read(rng.randint(1, 4096))
    elif mode == "sent":
        await asyncio.sleep(rng.uniform(0, 0.2))
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
    writer.transport.abort()


async def _ws_dropper(ws_url: str, rng: random.Random, i: int) -> None:
    """A /v1/stream session with replies in flight that is dropped: a close handshake
    mid-session, or a socket that just goes away."""
    ws = await ws_connect(ws_url)
    try:
        await ws.send(json.dumps({"type": "append", "text": f"Socket {i} keeps talking " * 3}))
        for r in range(rng.randint(1, 2)):
            await ws.send(json.dumps({"type": "generate", "id": f"r{r}", "ignore_eos": True,
                                      "max_tokens": rng.randint(MAX_TOKENS // 2, MAX_TOKENS)}))
        for _ in range(rng.randint(0, 12)):
            await asyncio.wait_for(ws.recv(), 30)
    finally:
        if rng.random() < 0.5:
            ws.transport.abort()  # vanished: no closing handshake
        else:
            await ws.close()


async def _session_abandoner(url: str, rng: random.Random, i: int) -> None:
    """A /v1/sessions client that feeds a session, maybe starts a streamed reply and drops
    it, and never deletes the session."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        sid = (await http.post("/v1/sessions", json={})).json()["session_id"]
        await http.post(f"/v1/sessions/{sid}/input", json={"text": f"Session {i} input " * 4})
        if rng.random() < 0.7:
            body = {"max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True}
            async with http.stream("POST", f"/v1/sessions/{sid}/generate", json=body) as r:
                seen, leave_after = 0, rng.randint(0, 8)
                async for line in r.aiter_lines():
                    seen += bool(line)
                    if seen >= leave_after:
                        break


async def _storm(url: str, rng: random.Random) -> list:
    host, port = url.removeprefix("http://").split(":")
    ws_url = url.replace("http://", "ws://") + "/v1/stream"
    clients = []
    for i in range(HTTP_CLIENTS):
        if i % 4 == 3:
            clients.append(_raw_killer(host, int(port), random.Random(rng.random()), i))
        else:
            clients.append(_http_leaver(url, random.Random(rng.random()), i))
    clients += [_ws_dropper(ws_url, random.Random(rng.random()), i) for i in range(WS_CLIENTS)]
    clients += [_session_abandoner(url, random.Random(rng.random()), i)
                for i in range(SESSION_CLIENTS)]
    rng.shuffle(clients)

    async def staggered(k: int, client) -> None:  # noqa: ANN001
        await asyncio.sleep(k * 0.01)  # all within half a second: a storm, not a queue
        await client

    return await asyncio.gather(*(staggered(k, c) for k, c in enumerate(clients)),
                                return_exceptions=True)


# ------------------------------------------------------------------------- the tests


def _victim(url: str) -> tuple[str, str]:
    r = httpx.post(f"{url}/v1/completions", json=VICTIM, timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice["text"], choice["finish_reason"]


def _streamed_victim(url: str) -> str:
    text = ""
    with httpx.stream("POST", f"{url}/v1/completions", json={**VICTIM, "stream": True},
                      timeout=60) as r:
        assert r.status_code == 200
        events = [line[len("data: "):] for line in r.iter_lines() if line]
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        chunk = json.loads(event)
        assert "error" not in chunk, chunk
        text += chunk["choices"][0]["text"]
    return text


@pytest.mark.parametrize("round_", [1, 2])
def test_storm_leaves_the_server_clean_and_correct(server, server_errors, round_):
    """Two rounds: the second storm hits a server that already survived one."""
    assert wait_until(lambda: _quiet(server.url), timeout=10)
    before = _victim(server.url)
    aborted = scrape(server.url).get('livelm_requests_total{finish_reason="abort"}', 0)

    results = asyncio.run(_storm(server.url, random.Random(SEED + round_)))
    failures = [r for r in results if isinstance(r, BaseException)
                and not isinstance(r, httpx.TransportError | ConnectionError | OSError)]
    assert not failures, failures  # a client may see its own connection drop, nothing else

    # Abandoned input sessions are closed after the idle timeout; everything else at once.
    assert wait_until(lambda: _quiet(server.url), timeout=IDLE_TIMEOUT_S + 15), scrape(server.url)
    m = scrape(server.url)
    assert m['livelm_requests_total{finish_reason="abort"}'] - aborted >= HTTP_CLIENTS // 2
    assert server.app.state.livelm.admission.in_flight == 0
    assert _victim(server.url) == before
    assert _streamed_victim(server.url) == before[0]
    assert not server_errors, [r.getMessage() for r in server_errors]  # no traceback, no 500
