"""Answering a request with an OpenAI-shaped error from inside an ASGI middleware."""

from __future__ import annotations

import json

from starlette.types import Send

from livelm.entrypoints.openai.errors import OpenAIError


async def send_error(send: Send, err: OpenAIError) -> None:
    """Send ``err`` as a complete JSON response."""
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    for name, value in (err.headers or {}).items():
        headers.append((name.lower().encode(), value.encode()))
    await send({"type": "http.response.start", "status": err.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
