"""What a request asks of the KV cache beyond sampling: its session and its cache salt.

Parsed and checked once, where a request enters the engine (``LLM.generate``/``chat``,
``AsyncEngine.generate``, ``InputStream.generate``), then passed down as typed fields to
:class:`~livelm.core.request.Request`. The public spelling stays
``SamplingParams.extra["session_id" / "session_ttl" / "cache_salt"]`` (the HTTP fields
and docs/sessions.md); :meth:`RequestOptions.from_extra` reads it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

# The longest a request may pin its session's KV (7 days, in seconds): a pin's expiry is a
# deadline the engine loop waits on, and a wait must stay a finite, representable time.
MAX_SESSION_TTL_S = 7 * 24 * 3600.0


@dataclass(frozen=True)
class RequestOptions:
    """``session_id`` names a session whose KV stays pinned after the turn, ``session_ttl``
    (seconds, finite, in [0, ``MAX_SESSION_TTL_S`` = 7 days]) overrides the engine's pin time for this turn, and ``cache_salt`` keeps
    the request's KV apart from other salts (per tenant; an empty salt is no salt).
    """

    session_id: str | None = None
    session_ttl: float | None = None
    cache_salt: str | None = None

    def __post_init__(self) -> None:
        session_id, ttl, salt = self.session_id, self.session_ttl, self.cache_salt
        if session_id is not None and (not isinstance(session_id, str) or not session_id):
            raise ValueError(f"session_id must be a non-empty string, got {session_id!r}")
        if ttl is not None and (
            isinstance(ttl, bool) or not isinstance(ttl, int | float)
            or not (isinstance(ttl, int) or math.isfinite(ttl)) or not 0 <= ttl <= MAX_SESSION_TTL_S
        ):
            raise ValueError(
                f"session_ttl must be a number of seconds >= 0 and <= {MAX_SESSION_TTL_S:g} (7 days), got {ttl!r:.40}"
            )
        if salt is not None and not isinstance(salt, str):
            raise ValueError(f"cache_salt must be a string, got {salt!r}")
        if ttl is not None:
            object.__setattr__(self, "session_ttl", float(ttl))
        if salt == "":
            object.__setattr__(self, "cache_salt", None)

    @classmethod
    def from_extra(
        cls, extra: Mapping | None, session_id: str | None = None, session_ttl: float | None = None
    ) -> RequestOptions:
        """The options in ``SamplingParams.extra``; ``session_id``/``session_ttl``, when given,
        override the entries of the same name (the API keyword arguments)."""
        extra = extra or {}
        return cls(
            session_id=extra.get("session_id") if session_id is None else session_id,
            session_ttl=extra.get("session_ttl") if session_ttl is None else session_ttl,
            cache_salt=extra.get("cache_salt"),
        )


NO_OPTIONS = RequestOptions()
