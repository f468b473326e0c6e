"""Graceful shutdown: on SIGINT/SIGTERM refuse new requests at once (503), let those in
flight finish for up to the drain timeout, then end the rest with an OpenAI-style error
and exit (docs/serving.md#shutdown).

:class:`Drain` is the app's side (a flag, the count of requests in flight, the ASGI
middleware that answers 503 once it is set); :class:`DrainingServer` is uvicorn's: its
signal handler starts the drain instead of uvicorn's own graceful shutdown, whose
timeout cancels what is left (a plain-text 500, or a stream cut without a word).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from livelm.entrypoints.openai.asgi_reject import send_error
from livelm.entrypoints.openai.errors import OpenAIError

logger = logging.getLogger("livelm.server")

# After the cut, how long the responses just ended (error bodies, final SSE events) may
# take to be written before uvicorn closes what is left.
FLUSH_TIMEOUT_S = 2.0


def shutting_down_error() -> OpenAIError:
    """What a request that arrives during shutdown gets."""
    return OpenAIError("the server is shutting down", 503, "service_unavailable",
                       code="server_shutdown", headers={"Connection": "close"})


class Drain:
    """The shutdown state of one app, shared by its middleware and the server.

    ``admission`` (the app's :class:`AdmissionControl`) counts the sequences admitted and
    not finished, WebSocket replies included; HTTP requests are counted here, so the
    drain also waits for responses still being written.
    """

    def __init__(self, admission: Any, timeout_s: float) -> None:
        self.admission = admission
        self.timeout_s = timeout_s
        self.draining = False
        self.started_at: float | None = None
        self.http_in_flight = 0
        self._hurry = asyncio.Event()  # a second signal: end the drain now

    def begin(self) -> None:
        """Refuse new requests from now on (safe to call from a signal handler)."""
        if not self.draining:
            self.draining = True
            self.started_at = time.monotonic()

    def hurry(self) -> None:
        """End the drain now (call on the event loop)."""
        self._hurry.set()

    @property
    def in_flight(self) -> int:
        """Requests and sequences not finished (0 when the drain may end)."""
        return self.http_in_flight + (self.admission.in_flight if self.admission else 0)

    async def _wait(self, idle: Callable[[], bool], timeout_s: float) -> bool:
        """Wait until ``idle()``, a hurry, or ``timeout_s``; True when idle."""
        deadline = time.monotonic() + timeout_s
        while not idle():
            if time.monotonic() >= deadline or self._hurry.is_set():
                return False
            await asyncio.sleep(0.01)  # admission tickets change without telling anyone
        return True

    async def run(self, cut: Callable[[], Awaitable[None]]) -> None:
        """Drain: wait for in-flight work up to the timeout, then ``cut()`` (stop the
        engine, which ends what is left with an error), then let the responses go out."""
        self.begin()
        assert self.started_at is not None
        logger.info("shutting down: new requests get 503; %d request(s)/sequence(s) in "
                    "flight may finish for up to %gs", self.in_flight, self.timeout_s)
        left = self.started_at + self.timeout_s - time.monotonic()
        drained = await self._wait(lambda: self.in_flight == 0, left)
        if not drained:
            logger.warning("drain timeout (%gs): ending %d request(s)/sequence(s) still in "
                           "flight with an error", self.timeout_s, self.in_flight)
        await cut()
        if not await self._wait(lambda: self.http_in_flight == 0, FLUSH_TIMEOUT_S):
            logger.warning("%d response(s) still open after the shutdown cut",
                           self.http_in_flight)
        logger.info("drained in %.2fs", time.monotonic() - self.started_at)


class DrainMiddleware:
    """Outermost ASGI middleware: 503 (OpenAI body, ``Connection: close``) for every new
    request once the drain began; ``Connection: close`` on the responses still going out;
    a count of HTTP requests in flight."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        drain = self.drain
        if kind == "lifespan":
            await self.app(scope, receive, send)
            return
        if drain.draining:
            if kind == "http":
                await send_error(send, shutting_down_error())
            else:
                await _refuse_websocket(scope, send)
            return
        if kind != "http":  # a WebSocket: its replies hold admission tickets
            await self.app(scope, receive, send)
            return

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start" and drain.draining:
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        drain.http_in_flight += 1
        try:
            await self.app(scope, receive, send_closing)
        finally:
            drain.http_in_flight -= 1


async def _refuse_websocket(scope: Scope, send: Send) -> None:
    err = shutting_down_error()
    if "websocket.http.response" in scope.get("extensions", {}):
        body = json.dumps(err.body()).encode()
        await send({"type": "websocket.http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "websocket.http.response.body", "body": body})
    else:  # refuse the handshake (403); 1012: service restart
        await send({"type": "websocket.close", "code": 1012})


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with SIGINT/SIGTERM starting :meth:`Drain.run` instead of its
    own graceful shutdown; a second signal ends the drain at once, a third forces exit.

    The listener stays open while draining, so late clients get a 503 rather than a
    refused connection; uvicorn's shutdown (close the listener and the idle connections,
    lifespan shutdown) follows the drain.
    """

    def __init__(self, config: uvicorn.Config, drain: Drain,
                 cut: Callable[[], Awaitable[None]]) -> None:
        super().__init__(config)
        self.drain = drain
        self._cut = cut
        self._signals = 0
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not uvicorn's: it would record the signal and raise it again after the shutdown,
        # turning a clean exit into KeyboardInterrupt or death by SIGTERM.
        self._signals += 1
        name = signal.Signals(sig).name
        if self._signals == 1:
            self.drain.begin()  # from now on new requests get 503
            if self._loop is None:
                self.should_exit = True
            else:
                self._loop.call_soon_threadsafe(self._start)
            return
        if self._signals == 2:
            logger.warning("%s again: ending the drain now", name)
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self.drain.hurry)
            return
        logger.warning("%s a third time: exiting without waiting", name)
        self.should_exit = self.force_exit = True

    def _start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self.drain.run(self._cut)
        except Exception:  # never keep the process up because the drain failed
            logger.exception("draining failed")
        finally:
            self.should_exit = True
