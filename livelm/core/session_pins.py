"""Sessions: the KV of a finished turn stays pinned for a time-to-live (Continuum-style).

A pin holds references to the blocks of a session's last turn (prompt and output), so the
next turn that extends the history prefills only its new tokens. Pins outrank the prefix
cache's LRU (cached free blocks are reused first) but never live work: when the pool runs
dry, pins are dropped soonest-expiry first before any running request is preempted.
Time is whatever the caller passes as ``now`` (the scheduler's injectable clock).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Protocol

from livelm.core.block_pool import BlockPool
from livelm.core.request import Request
from livelm.core.token_ids import common_prefix_len


@dataclass
class Pin:
    """One session's retained KV: ``block_ids`` hold the KV of ``token_ids``, in order."""

    session_id: str
    block_ids: list[int]
    token_ids: list[int]
    salt: str | None
    expires_at: float
    # A sinks request's logical table (core/kv_policy.py): blocks rolled out before the pin.
    num_evicted_blocks: int = 0


class SessionPins(Protocol):
    """Keeps session KV alive between turns (the policy the KV manager consults)."""

    num_expired: int
    num_dropped: int
    num_closed: int

    @property
    def num_sessions(self) -> int:
        """Sessions holding a pin."""
        ...

    @property
    def num_pinned_blocks(self) -> int:
        """Distinct blocks held by pins."""
        ...

    def pin(self, session_id: str, block_ids: list[int], token_ids: list[int], salt: str | None,
            expires_at: float, num_evicted_blocks: int = 0) -> None:
        """Take over the references to ``block_ids`` (replacing the session's older pin)."""
        ...

    def match(self, request: Request, block_size: int) -> tuple[list[int], int]:
        """Reference the pinned blocks that hold the request's leading tokens: (blocks, tokens)."""
        ...

    def release(self, session_id: str) -> bool:
        """Drop a session's pin; False when it had none."""
        ...

    def close(self, session_id: str) -> bool:
        """Drop a session's pin because the user closed it."""
        ...

    def expire(self, now: float) -> int:
        """Drop every pin whose time is up; returns how many."""
        ...

    def drop_soonest(self) -> bool:
        """Drop the pin that would expire first (memory pressure); False when none is left."""
        ...

    def reclaimable_blocks(self) -> int:
        """Blocks that would become free if every pin were dropped."""
        ...

    def next_expiry(self) -> float | None:
        """When the next pin expires (None without pins)."""
        ...


class TtlSessionPins:
    """Session pins with a time-to-live, dropped soonest-expiry first under pressure."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self._pins: dict[str, Pin] = {}
        self._holders: Counter[int] = Counter()  # block -> number of pins holding it
        self.num_expired = 0
        self.num_dropped = 0
        self.num_closed = 0

    @property
    def num_sessions(self) -> int:
        """Sessions holding a pin."""
        return len(self._pins)

    @property
    def num_pinned_blocks(self) -> int:
        """Distinct blocks held by pins (a shared system prompt counts once)."""
        return len(self._holders)

    def get(self, session_id: str) -> Pin | None:
        """The session's pin, if any."""
        return self._pins.get(session_id)

    def pin(self, session_id: str, block_ids: list[int], token_ids: list[int], salt: str | None,
            expires_at: float, num_evicted_blocks: int = 0) -> None:
        """See :meth:`SessionPins.pin`."""
        self.release(session_id)
        self._pins[session_id] = Pin(session_id, list(block_ids), list(token_ids), salt, expires_at,
                                     num_evicted_blocks)
        self._holders.update(block_ids)

    def match(self, request: Request, block_size: int) -> tuple[list[int], int]:
        """See :meth:`SessionPins.match`.

        The common prefix may end inside a block: the request then continues writing that
        block, which is safe only while nobody else can read it (the pin is its only holder
        and it is not a full block of the prefix cache). Otherwise the hit stops at the
        block's start. The request's last token is never covered.

        A pin of a sinks request that rolled blocks out (``num_evicted_blocks``) is taken
        whole or not at all: only its end has the window the next token needs. It sets
        the request's ``num_evicted_blocks`` to the pin's.
        """
        pin = self._pins.get(request.session_id) if request.session_id else None
        if pin is None or pin.salt != request.cache_salt:
            return [], 0
        limit = min(len(pin.token_ids), request.num_tokens - 1)
        common = common_prefix_len(pin.token_ids, request.all_token_ids, limit)
        if pin.num_evicted_blocks:
            last = pin.block_ids[-1]
            if common < len(pin.token_ids) or (
                common % block_size and (self.pool.ref_count(last) != 1 or self.pool.is_cached(last))
            ):
                return [], 0
            self.pool.share(pin.block_ids)
            request.num_evicted_blocks = pin.num_evicted_blocks
            return list(pin.block_ids), common
        full, rest = divmod(common, block_size)
        blocks = pin.block_ids[:full]
        num_tokens = full * block_size
        if rest:
            last = pin.block_ids[full]
            if self.pool.ref_count(last) == 1 and not self.pool.is_cached(last):
                blocks = pin.block_ids[: full + 1]
                num_tokens = common
        self.pool.share(blocks)
        return list(blocks), num_tokens

    def release(self, session_id: str) -> bool:
        """See :meth:`SessionPins.release`."""
        pin = self._pins.pop(session_id, None)
        if pin is None:
            return False
        self._holders.subtract(pin.block_ids)
        for b in pin.block_ids:
            if self._holders[b] <= 0:
                del self._holders[b]
        # Last-first, so the LRU evicts a prefix's deepest blocks first.
        self.pool.release(reversed(pin.block_ids))
        return True

    def close(self, session_id: str) -> bool:
        """See :meth:`SessionPins.close`."""
        closed = self.release(session_id)
        self.num_closed += closed
        return closed

    def expire(self, now: float) -> int:
        """See :meth:`SessionPins.expire`."""
        due = [sid for sid, pin in self._pins.items() if pin.expires_at <= now]
        for sid in due:
            self.release(sid)
        self.num_expired += len(due)
        return len(due)

    def drop_soonest(self) -> bool:
        """See :meth:`SessionPins.drop_soonest`."""
        if not self._pins:
            return False
        soonest = min(self._pins.values(), key=lambda p: p.expires_at)
        self.release(soonest.session_id)
        self.num_dropped += 1
        return True

    def reclaimable_blocks(self) -> int:
        """See :meth:`SessionPins.reclaimable_blocks` (blocks only pins hold)."""
        return sum(1 for b, k in self._holders.items() if self.pool.ref_count(b) == k)

    def next_expiry(self) -> float | None:
        """See :meth:`SessionPins.next_expiry`."""
        return min((p.expires_at for p in self._pins.values()), default=None)

