"""Server-sent events as OpenAI streams them: ``data: {json}`` events, then ``data: [DONE]``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from livelm.entrypoints.openai.errors import OpenAIError

DONE = "data: [DONE]\n\n"


def sse_event(chunk: BaseModel, include_usage: bool) -> str:
    """One event; ``usage`` appears (as null until the end) only when the client asked."""
    exclude = None if include_usage else {"usage"}
    return f"data: {chunk.model_dump_json(exclude=exclude)}\n\n"


def sse_error(err: OpenAIError) -> str:
    """An error after the stream started: OpenAI clients raise on an ``error`` event."""
    return f"data: {json.dumps(err.body())}\n\n"


class SSEResponse(StreamingResponse):
    """A streaming response that runs ``on_close`` however the stream ends.

    Starlette cancels the stream when the client disconnects; if that happens before the
    event generator took its first step, the generator's own ``finally`` never runs, so
    the cleanup is also hooked here.
    """

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(
            events,
            media_type="text/event-stream",
            # Proxies must not buffer, or tokens arrive in bursts.
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()
