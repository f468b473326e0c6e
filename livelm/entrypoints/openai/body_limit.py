"""A request body size limit (413), enforced before any parsing."""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from livelm.entrypoints.openai.asgi_reject import send_error
from livelm.entrypoints.openai.errors import OpenAIError


class BodySizeLimitMiddleware:
    """Refuse bodies larger than ``max_bytes`` with 413.

    A declared ``Content-Length`` over the limit is refused at once; otherwise the body is
    read up to the limit (chunked uploads declare no length) and replayed to the app, so
    an oversized body is never held in full nor parsed.
    """

    def __init__(self, app: ASGIApp, max_bytes: int,
                 on_reject: Callable[[str], None] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self._on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._reject(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            # Later calls wait for the disconnect, which handlers watch for.
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, send: Send) -> None:
        if self._on_reject:
            self._on_reject("body_too_large")
        await send_error(send, OpenAIError(
            f"request body exceeds the limit of {self.max_bytes} bytes", 413,
            "invalid_request_error", code="request_too_large",
        ))
