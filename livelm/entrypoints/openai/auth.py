"""Bearer-key authentication for the API routes."""

from __future__ import annotations

import hmac
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from livelm.entrypoints.openai.asgi_reject import send_error
from livelm.entrypoints.openai.errors import OpenAIError

# /health and /metrics stay open: load balancers and Prometheus probe them without
# credentials, and they reveal no prompts or outputs.
PROTECTED_PREFIXES = ("/v1", "/tokenize", "/detokenize")


class BearerAuthMiddleware:
    """Reject requests to protected routes without ``Authorization: Bearer <key>`` (401).

    Runs before the body is read, so unauthenticated clients cost almost nothing.
    CORS preflight (OPTIONS) passes: browsers never send credentials with it.
    """

    def __init__(self, app: ASGIApp, api_key: str,
                 on_reject: Callable[[str], None] | None = None) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()
        self._on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or not _protected(scope["path"]):
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        # compare_digest: the time taken must not reveal how much of the key matched.
        if hmac.compare_digest(given, self._expected):
            await self.app(scope, receive, send)
            return
        if self._on_reject:
            self._on_reject("unauthorized")
        await send_error(send, OpenAIError(
            "missing or invalid API key: send 'Authorization: Bearer <key>'",
            401, "authentication_error", code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        ))


def _protected(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in PROTECTED_PREFIXES)
