"""Shared helpers of the server tests: a real uvicorn server on a free loopback port, the
tiny real engine, an engine wrapper that fails mid-stream, and HTTP/metrics helpers."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from livelm.entrypoints.openai import ServerConfig, build_app


class ServerThread:
    """A uvicorn server for ``app`` on 127.0.0.1, run by a background thread.

    The socket is bound before the thread starts (port 0: the OS picks a free port), so
    there is no race between choosing a port and another process taking it.
    """

    def __init__(self, app, log_level: str = "warning") -> None:  # noqa: ANN001
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(
            app, log_level=log_level, access_log=False, timeout_graceful_shutdown=5
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:PORT."""
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def serve(engine, **config) -> ServerThread:  # noqa: ANN001
    """A server for ``engine`` with ServerConfig fields ``config``; it runs inside ``with``."""
    config.setdefault("shutdown_engine", False)
    return ServerThread(build_app(engine, ServerConfig(**config)))


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def scrape(url: str, headers: dict | None = None) -> dict[str, float]:
    """``/metrics`` as {"name{labels}": value}."""
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=10).text
    samples = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            samples[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return samples


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:  # noqa: ANN001
    """Poll ``predicate`` until true or ``timeout``; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return bool(value)
        time.sleep(interval)


# --------------------------------------------------------------------- a failing engine


class FailingEngine:
    """A real engine whose streams break after ``fail_after`` outputs, as a crashed engine
    step would; everything else is the wrapped engine's."""

    def __init__(self, engine, fail_after: int) -> None:  # noqa: ANN001
        self._engine = engine
        self._fail_after = fail_after

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self._engine, name)

    async def generate(self, prompt, params, request_id=None):  # noqa: ANN001, ANN201
        """The wrapped engine's outputs, then RuntimeError."""
        outputs = self._engine.generate(prompt, params, request_id=request_id)
        try:
            count = 0
            async for out in outputs:
                if count == self._fail_after:
                    raise RuntimeError("engine step failed")
                count += 1
                yield out
        finally:
            await outputs.aclose()  # aborts the real request, as the real failure path does


# --------------------------------------------------------------------- the real engine


def start_engine(model_dir: Path, **kwargs):  # noqa: ANN201
    """An AsyncEngine on a tiny model, small enough for CI (kwargs override)."""
    from livelm.engine.async_engine import AsyncEngine

    kwargs.setdefault("max_model_len", 256)
    kwargs.setdefault("kv_cache_gib", 0.25)
    return AsyncEngine(str(model_dir), **kwargs)


def stop_engine(engine) -> None:  # noqa: ANN001
    """Shut an engine down from synchronous test code."""
    asyncio.run(engine.shutdown())


def sse_events(response: httpx.Response) -> list[str]:
    """The ``data:`` payloads of a streamed response, in order (``[DONE]`` included)."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            events.append(line[len("data: ") :])
        else:
            assert line == "", f"unexpected SSE line {line!r}"
    return events


def greedy_text(engine, prompt: str, max_tokens: int) -> str:  # noqa: ANN001
    """The greedy reply text of an AsyncEngine-shaped ``engine`` to ``prompt`` (a reference)."""
    from livelm.sampling_params import SamplingParams

    async def run() -> str:
        text = ""
        async for out in engine.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0)):
            text += out.outputs[0].text
        return text
    return asyncio.run(run())
