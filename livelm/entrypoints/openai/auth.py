"""Bearer-key authentication for the API routes (and the key check the WebSocket uses)."""

from __future__ import annotations

import hmac
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from livelm.entrypoints.openai.asgi_reject import send_error
from livelm.entrypoints.openai.errors import OpenAIError

# /health and /metrics stay open: load balancers and Prometheus probe them without
# credentials, and they reveal no prompts or outputs.
PROTECTED_PREFIXES = ("/v1", "/tokenize", "/detokenize")


def key_matches(api_key: str, authorization: bytes, query_key: str = "") -> bool:
    """Whether a request carries ``api_key``: as ``Authorization: Bearer <key>``, or as a
    ``?api_key=`` value (``query_key``: the WebSocket's way, since browsers cannot set
    headers on one).

    hmac.compare_digest: the time taken must not reveal how much of the key matched.
    """
    if hmac.compare_digest(authorization, f"Bearer {api_key}".encode()):
        return True
    return bool(query_key) and hmac.compare_digest(query_key.encode(), api_key.encode())


def invalid_api_key(other_way: str = "", headers: dict[str, str] | None = None) -> OpenAIError:
    """The 401 of a missing or wrong key; ``other_way`` names another way to send it."""
    return OpenAIError(f"missing or invalid API key: send 'Authorization: Bearer <key>'{other_way}",
                       401, "authentication_error", code="invalid_api_key", headers=headers)


class BearerAuthMiddleware:
    """Reject requests to protected routes without ``Authorization: Bearer <key>`` (401).

    Runs before the body is read, so unauthenticated clients cost almost nothing.
    CORS preflight (OPTIONS) passes: browsers never send credentials with it.
    """

    def __init__(self, app: ASGIApp, api_key: str,
                 on_reject: Callable[[str], None] | None = None) -> None:
        self.app = app
        self._api_key = api_key
        self._on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or not _protected(scope["path"]):
            await self.app(scope, receive, send)
            return
        if key_matches(self._api_key, dict(scope["headers"]).get(b"authorization", b"")):
            await self.app(scope, receive, send)
            return
        if self._on_reject:
            self._on_reject("unauthorized")
        await send_error(send, invalid_api_key(headers={"WWW-Authenticate": "Bearer"}))


def _protected(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in PROTECTED_PREFIXES)
