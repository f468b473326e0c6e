"""What a request keeps in its KV cache: everything (``full``), or attention sinks plus a
rolling window (``sinks``, StreamingLLM: Xiao et al., ICLR 2024; docs/attention_sinks.md).

Under ``sinks`` the query at text position ``t`` attends to the first ``num_sink_tokens``
tokens of the request and to the ``window`` most recent ones (itself included), nothing
in between; blocks that hold only tokens no later query can see go back to the pool, so
the request's memory is bounded whatever its length. Positions are those of the cache:
the sinks sit at 0 .. S-1 and the window right after them, so the newest query is never
further than S + window - 1 from anything it sees (docs/attention_sinks.md explains how
the attention path rotates keys by these positions).

Pure data, no torch: checked once where a request enters the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

KV_POLICIES = ("full", "sinks")
DEFAULT_NUM_SINK_TOKENS = 4
# Bounds that keep every derived count a small int; the engine checks the model's own
# limits (context length, block size) at admission.
MAX_KV_WINDOW = 1 << 24
MAX_NUM_SINK_TOKENS = 1 << 16


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class KVPolicy:
    """``kind`` ``"full"`` keeps every token (the default); ``"sinks"`` keeps the first
    ``num_sink_tokens`` tokens (default 4) and the last ``window`` tokens."""

    kind: str = "full"
    num_sink_tokens: int = DEFAULT_NUM_SINK_TOKENS
    window: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KV_POLICIES:
            raise ValueError(f"kv_policy must be one of {', '.join(KV_POLICIES)}, got {self.kind!r:.60}")
        sinks, window = self.num_sink_tokens, self.window
        if not _is_int(sinks) or not 0 <= sinks <= MAX_NUM_SINK_TOKENS:
            raise ValueError(f"num_sink_tokens must be an integer in [0, {MAX_NUM_SINK_TOKENS}], got {sinks!r:.40}")
        if self.kind == "full":
            if window is not None:
                raise ValueError("kv_window applies to kv_policy 'sinks' only (kv_policy 'full' keeps every token)")
            return
        if window is None:
            raise ValueError("kv_window is required by kv_policy 'sinks': how many recent tokens to keep")
        if not _is_int(window) or not 1 <= window <= MAX_KV_WINDOW:
            raise ValueError(f"kv_window must be an integer in [1, {MAX_KV_WINDOW}], got {window!r:.40}")
        if sinks > window:
            raise ValueError(f"num_sink_tokens ({sinks}) must not exceed kv_window ({window})")

    @property
    def is_sinks(self) -> bool:
        """True for the rolling-window policy."""
        return self.kind == "sinks"

    def num_sink_blocks(self, block_size: int) -> int:
        """Leading blocks a sinks request never releases (they hold its sink tokens); 0 for ``full``."""
        return -(-self.num_sink_tokens // block_size) if self.is_sinks else 0

    def window_start(self, position: int, floor: int = 0) -> int:
        """The first non-sink text position the query at ``position`` attends to (never
        before ``floor``: what a preempted request kept, ``Request.kv_floor``)."""
        return max(self.num_sink_tokens, position - self.window + 1, floor)

    def cache_position(self, position: int) -> int:
        """Where the query at text ``position`` sits in its cache (sinks first, then the window)."""
        return self.num_sink_tokens + position - self.window_start(position) if position >= self.num_sink_tokens else position

    def salt(self, salt: str | None) -> str | None:
        """The prefix-cache salt of a request with this policy: a ``sinks`` request's KV
        (keys stored unrotated, each computed over its own window) is shared only with
        requests of the same policy, never with ``full`` ones."""
        if not self.is_sinks:
            return salt
        return f"{salt or ''}\x1fkv:sinks:{self.num_sink_tokens}:{self.window}"


FULL = KVPolicy()


def parse_kv_policy(kind: object = None, num_sink_tokens: object = None, window: object = None) -> KVPolicy:
    """The policy named by the public fields (``kv_policy``, ``num_sink_tokens``,
    ``kv_window``; None: not given). ValueError naming the field for anything else."""
    if kind is None:
        if num_sink_tokens is not None or window is not None:
            raise ValueError("num_sink_tokens and kv_window need kv_policy 'sinks'")
        return FULL
    if not isinstance(kind, str):
        raise ValueError(f"kv_policy must be a string ('full' or 'sinks'), got {type(kind).__name__}")
    if kind == "full" and num_sink_tokens is not None:
        raise ValueError("num_sink_tokens applies to kv_policy 'sinks' only")
    sinks = DEFAULT_NUM_SINK_TOKENS if num_sink_tokens is None else num_sink_tokens
    return KVPolicy(kind, sinks, window)  # type: ignore[arg-type]
