"""Which replica serves a request: cache affinity within a load cap, else the least load.

The cache-aware router (docs/distributed.md) keeps, per replica, the block hashes of the
prompts (and completions) it sent there, chained exactly as the prefix cache keys its
blocks (``core/prefix_cache.default_block_hash`` over full blocks, with the request's
cache salt), so it knows which replica most likely still holds a prompt's leading KV. In
order it prefers: the replica of the request's session (its KV is pinned there), then the
replica where the request's work would start soonest: the least (load + the prompt's
tokens it does not cache), load being waiting + running tokens as the replicas report
them, so a cached prefix wins where the prefill it saves outweighs the queue it joins. A
replica is an affinity target only while its load is at most ``load_cap_factor`` times
the least load plus ``load_cap_slack_tokens``. Open input streams are not routed here:
their replies must go to the replica holding their KV. ``round_robin`` ignores all of
this (the baseline).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from livelm.core.prefix_cache import default_block_hash

ROUTER_CHOICES = ("cache_aware", "round_robin")


@dataclass(frozen=True)
class RouterConfig:
    """How the router weighs affinity against load (validated when built)."""

    policy: str = "cache_aware"
    block_size: int = 16
    load_cap_factor: float = 2.0
    load_cap_slack_tokens: int = 2048
    max_blocks_per_replica: int = 200_000  # remembered hashes per replica (LRU)
    max_sessions: int = 100_000

    def __post_init__(self) -> None:
        if self.policy not in ROUTER_CHOICES:
            raise ValueError(f"router must be one of {', '.join(ROUTER_CHOICES)}, got {self.policy!r}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if not self.load_cap_factor >= 1.0:
            raise ValueError(f"load_cap_factor must be >= 1, got {self.load_cap_factor}")
        if self.load_cap_slack_tokens < 0:
            raise ValueError(f"load_cap_slack_tokens must be >= 0, got {self.load_cap_slack_tokens}")


@dataclass(frozen=True)
class RouteRequest:
    """What routing looks at: the prompt's ids, its cache salt and its session."""

    token_ids: Sequence[int]
    cache_salt: str | None = None
    session_id: str | None = None


@dataclass(frozen=True)
class Route:
    """Where a request goes and why (``session``, ``prefix``, ``load`` or ``round_robin``);
    ``cached_blocks`` of its leading blocks are thought cached there; ``rerouted`` when an
    affinity target was passed over (over the load cap); ``session_lost`` when the
    session's replica failed since its last turn."""

    replica: int
    reason: str
    cached_blocks: int = 0
    rerouted: bool = False
    session_lost: bool = False


@dataclass
class RouterStats:
    """Counters over the router's life (the server's metrics)."""

    routed: int = 0
    session_hits: int = 0
    prefix_hits: int = 0
    reroutes: int = 0
    sessions_lost: int = 0


def block_hashes(token_ids: Sequence[int], block_size: int, salt: str | None) -> list[int]:
    """Chained keys of the full blocks of ``token_ids`` the prefix cache could hold (the
    last token is never covered by a cache hit, so neither is it here)."""
    keys: list[int] = []
    parent: int | None = None
    usable = max(0, len(token_ids) - 1)
    for start in range(0, usable - block_size + 1, block_size):
        parent = default_block_hash(parent, tuple(token_ids[start:start + block_size]), salt)
        keys.append(parent)
    return keys


class Router:
    """Routes requests over ``num_replicas`` replicas (some may be out of rotation)."""

    def __init__(self, num_replicas: int, config: RouterConfig | None = None) -> None:
        self.config = config or RouterConfig()
        self.num_replicas = num_replicas
        self.stats = RouterStats()
        self._blocks: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(num_replicas)]
        self._sessions: OrderedDict[str, int] = OrderedDict()
        self._lost_sessions: set[str] = set()
        self._in_rotation = [True] * num_replicas
        self._rr = itertools.count()

    # ------------------------------------------------------------- rotation

    def in_rotation(self, replica: int) -> bool:
        """True while ``replica`` takes requests."""
        return self._in_rotation[replica]

    def remove(self, replica: int) -> None:
        """Take a failed replica out of rotation: what it cached is gone, and its sessions
        are marked lost (reported on their next use)."""
        self._in_rotation[replica] = False
        self._blocks[replica].clear()
        for sid, where in list(self._sessions.items()):
            if where == replica:
                del self._sessions[sid]
                self._lost_sessions.add(sid)

    def add(self, replica: int) -> None:
        """Put a (restarted) replica back into rotation, its cache empty."""
        self._blocks[replica].clear()
        self._in_rotation[replica] = True

    def session_replica(self, session_id: str) -> int | None:
        """The replica holding a session's KV, if known."""
        return self._sessions.get(session_id)

    def forget_session(self, session_id: str) -> None:
        """The session was closed by its owner."""
        self._sessions.pop(session_id, None)
        self._lost_sessions.discard(session_id)

    def take_lost(self, session_id: str | None) -> bool:
        """True (once) when ``session_id`` lost its KV with a failed replica."""
        if session_id is None or session_id not in self._lost_sessions:
            return False
        self._lost_sessions.discard(session_id)
        self.stats.sessions_lost += 1
        return True

    # -------------------------------------------------------------- routing

    def route(self, request: RouteRequest, loads: Sequence[int]) -> Route:
        """Pick a replica in rotation for ``request`` given each replica's load in tokens
        (ValueError when none is in rotation)."""
        live = [i for i in range(self.num_replicas) if self._in_rotation[i]]
        if not live:
            raise ValueError("no replica is in rotation")
        self.stats.routed += 1
        if self.config.policy == "round_robin":
            return Route(live[next(self._rr) % len(live)], "round_robin")
        least = min(loads[i] for i in live)
        cap = least * self.config.load_cap_factor + self.config.load_cap_slack_tokens
        rerouted = False
        sid = request.session_id
        if sid is not None and sid in self._sessions:
            where = self._sessions[sid]
            if self._in_rotation[where] and loads[where] <= cap:
                self._sessions.move_to_end(sid)
                self.stats.session_hits += 1
                return Route(where, "session")
            rerouted = True
        keys = block_hashes(request.token_ids, self.config.block_size, request.cache_salt)
        hits = {i: self._leading_hits(i, keys) for i in live}
        most = max(hits.values())
        # Prefix affinity weighs the prefill a hit saves against the work queued there: the
        # replica with the least (load + this prompt's uncached tokens) wins, among those
        # within the cap. A short shared prefix (a system prompt) then no longer draws
        # every new conversation to one replica while the other idles.
        start = next(self._rr)  # ties (idle replicas) in turn, so sequential traffic spreads
        prompt = len(request.token_ids)
        eligible = [i for i in live if loads[i] <= cap] or live
        target = min(eligible, key=lambda i: (loads[i] + max(0, prompt - hits[i] * self.config.block_size),
                                              -hits[i], (i - start) % self.num_replicas))
        if most and hits[target] < most:
            rerouted = True  # the replica holding the longest prefix was passed over
        if rerouted:
            self.stats.reroutes += 1
        if hits[target]:
            self.stats.prefix_hits += 1
            return Route(target, "prefix", hits[target], rerouted)
        return Route(target, "load", 0, rerouted)

    def _leading_hits(self, replica: int, keys: list[int]) -> int:
        blocks = self._blocks[replica]
        n = 0
        for key in keys:
            if key not in blocks:
                break
            n += 1
        return n

    def record(self, replica: int, request: RouteRequest, token_ids: Sequence[int] | None = None) -> None:
        """Note what ``replica`` now caches: the blocks of ``token_ids`` (default the
        request's prompt; a finished request's prompt + completion), and its session."""
        if not self._in_rotation[replica]:
            return
        ids = request.token_ids if token_ids is None else token_ids
        if self.config.policy == "cache_aware":
            blocks = self._blocks[replica]
            # +1: the last full block counts once the next token exists (a completion).
            for key in block_hashes(list(ids) + [0], self.config.block_size, request.cache_salt):
                blocks[key] = None
                blocks.move_to_end(key)
            while len(blocks) > self.config.max_blocks_per_replica:
                blocks.popitem(last=False)
        if request.session_id is not None:
            self._sessions[request.session_id] = replica
            self._sessions.move_to_end(request.session_id)
            self._lost_sessions.discard(request.session_id)
            while len(self._sessions) > self.config.max_sessions:
                self._sessions.popitem(last=False)
