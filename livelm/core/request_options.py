"""What a request asks of the engine beyond sampling: its session and cache salt (the KV
cache), its KV policy (``full``, or attention sinks + a rolling window: core/kv_policy.py),
its priority, tenant and latency targets (the scheduler).

Parsed and checked once, where a request enters the engine (``LLM.generate``/``chat``,
``AsyncEngine.generate``, ``InputStream.generate``), then passed down as typed fields to
:class:`~livelm.core.request.Request`. The public spelling stays
``SamplingParams.extra["session_id" / "session_ttl" / "cache_salt" / "kv_policy" /
"num_sink_tokens" / "kv_window" / "priority" / "tenant" / "ttft_slo_ms" / "tpot_slo_ms" /
"speculative_method" / "num_speculative_tokens"]`` (the HTTP fields, docs/sessions.md,
docs/attention_sinks.md, docs/scheduling.md and docs/speculative_decoding.md);
:meth:`RequestOptions.from_extra` reads it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from livelm.core.kv_policy import FULL, KVPolicy, parse_kv_policy
from livelm.core.speculative.config import REQUEST_METHODS, check_method, check_num_tokens

# The longest a request may pin its session's KV (7 days, in seconds): a pin's expiry is a
# deadline the engine loop waits on, and a wait must stay a finite, representable time.
MAX_SESSION_TTL_S = 7 * 24 * 3600.0
# Latency targets are at most a day (in ms): a finite deadline the loop can compare with.
MAX_SLO_MS = 24 * 3600 * 1000.0
# Priorities a request may carry at all (the engine's max_priority narrows it).
PRIORITY_LIMIT = 1_000_000
MAX_TENANT_CHARS = 256


def check_slo_ms(name: str, value: object) -> float | None:
    """``value`` (milliseconds, or None) as a float when it is a valid latency target,
    else ValueError naming ``name``: a finite number > 0 and at most a day."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
        isinstance(value, int) or math.isfinite(value)
    ) or not 0 < value <= MAX_SLO_MS:
        raise ValueError(f"{name} must be a number of milliseconds > 0 and <= {MAX_SLO_MS:g} (a day), "
                         f"got {value!r:.40}")
    return float(value)


def check_priority(value: object, max_priority: int = PRIORITY_LIMIT) -> int:
    """``value`` when it is an integer priority in [-max_priority, max_priority], else
    ValueError saying so."""
    if isinstance(value, bool) or not isinstance(value, int) or not -max_priority <= value <= max_priority:
        raise ValueError(f"priority must be an integer from {-max_priority} to {max_priority}, got {value!r:.40}")
    return value


@dataclass(frozen=True)
class RequestOptions:
    """``session_id`` names a session whose KV stays pinned after the turn, ``session_ttl``
    (seconds, finite, in [0, ``MAX_SESSION_TTL_S`` = 7 days]) overrides the engine's pin time for this turn, and ``cache_salt`` keeps
    the request's KV apart from other salts (per tenant; an empty salt is no salt).

    Scheduling (docs/scheduling.md): ``priority`` (an integer, higher first under the
    priority policy; the engine's ``max_priority`` bounds it), ``tenant`` (whose share the
    fair policy balances; the server fills it from the API key when the request does not
    name one), ``ttft_slo_ms`` / ``tpot_slo_ms`` (this request's latency targets in
    milliseconds, overriding the engine's).
    ``speculative_method`` (``"ngram"``, ``"suffix"``, ``"draft"`` or ``"off"``) and
    ``num_speculative_tokens`` (1..64) override the engine's speculative decoding for this
    request (docs/speculative_decoding.md); None keeps the engine's.
    """

    session_id: str | None = None
    session_ttl: float | None = None
    cache_salt: str | None = None
    priority: int | None = None
    tenant: str | None = None
    ttft_slo_ms: float | None = None
    tpot_slo_ms: float | None = None
    # What the request keeps in its KV cache (core/kv_policy.py): every token by default.
    kv_policy: KVPolicy = FULL
    speculative_method: str | None = None
    num_speculative_tokens: int | None = None

    def __post_init__(self) -> None:
        self._check_scheduling()
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
        if not isinstance(self.kv_policy, KVPolicy):
            raise ValueError(f"kv_policy must be a KVPolicy, got {type(self.kv_policy).__name__}")
        if salt is not None and not isinstance(salt, str):
            raise ValueError(f"cache_salt must be a string, got {salt!r}")
        if self.speculative_method is not None:
            check_method(self.speculative_method, REQUEST_METHODS)
        if self.num_speculative_tokens is not None:
            check_num_tokens(self.num_speculative_tokens)
        if ttl is not None:
            object.__setattr__(self, "session_ttl", float(ttl))
        if salt == "":
            object.__setattr__(self, "cache_salt", None)

    def _check_scheduling(self) -> None:
        if self.priority is not None:
            check_priority(self.priority)
        tenant = self.tenant
        if tenant is not None and (not isinstance(tenant, str) or not 0 < len(tenant) <= MAX_TENANT_CHARS):
            raise ValueError(f"tenant must be a non-empty string of at most {MAX_TENANT_CHARS} characters, "
                             f"got {tenant!r:.40}")
        for name in ("ttft_slo_ms", "tpot_slo_ms"):
            object.__setattr__(self, name, check_slo_ms(name, getattr(self, name)))

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
            priority=extra.get("priority"),
            tenant=extra.get("tenant"),
            ttft_slo_ms=extra.get("ttft_slo_ms"),
            tpot_slo_ms=extra.get("tpot_slo_ms"),
            kv_policy=parse_kv_policy(extra.get("kv_policy"), extra.get("num_sink_tokens"), extra.get("kv_window")),
            speculative_method=extra.get("speculative_method"),
            num_speculative_tokens=extra.get("num_speculative_tokens"),
        )


NO_OPTIONS = RequestOptions()
