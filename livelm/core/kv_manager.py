"""Per-request block tables on top of the block pool, the prefix cache and session pins."""

from __future__ import annotations

from typing import NamedTuple

from livelm.core.block_pool import BlockPool
from livelm.core.prefix_cache import HashPrefixCache, NoPrefixCache, PrefixCache
from livelm.core.request import Request
from livelm.core.session_pins import SessionPins, TtlSessionPins


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """Blocks that hold ``num_tokens`` token slots."""
    return -(-num_tokens // block_size)


class KVCacheStats(NamedTuple):
    """The KV cache's load: the pool, the prefix cache and the session pins (see
    :class:`livelm.engine.engine.EngineStats` for what each count means). A tuple, so
    that taking it after every step costs next to nothing."""

    num_free_blocks: int
    num_total_blocks: int
    kv_usage: float
    prefix_cache_queried_tokens: int
    prefix_cache_hit_tokens: int
    num_cached_blocks: int
    num_cache_evictions: int
    num_sessions: int
    num_pinned_blocks: int
    num_session_pins_expired: int
    num_session_pins_dropped: int
    num_session_pins_closed: int
    num_touched_blocks: int
    num_evicted_tokens: int = 0  # tokens whose blocks rolled out of a window (sinks, sliding)


class KVCacheManager:
    """Grows, shares, reuses and frees the block table of each request.

    Memory is reclaimed in this order: plain free blocks, then cached free blocks (LRU),
    then session pins (soonest expiry first); only after that does the scheduler preempt.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 sliding_window: int | None = None) -> None:
        self.block_size = block_size
        # Every layer of the model slides by this window (None: some layer is global, or
        # none slides): blocks wholly before a request's window are released (roll).
        self.sliding_window = sliding_window
        self.pool = BlockPool(num_blocks)
        self.prefix_cache: PrefixCache = (
            HashPrefixCache(self.pool, block_size) if enable_prefix_caching else NoPrefixCache()
        )
        self.pool.on_evict = self.prefix_cache.on_evict
        self.sessions: SessionPins = TtlSessionPins(self.pool)
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0
        self.num_evicted_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks available to new tokens (cached free blocks included)."""
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of the pool in use, 0..1."""
        return self.pool.usage

    @property
    def capacity_tokens(self) -> int:
        """Token slots in the whole pool."""
        return self.pool.num_blocks * self.block_size

    def stats(self) -> KVCacheStats:
        """The cache's load now."""
        pool, sessions = self.pool, self.sessions
        return KVCacheStats(
            num_free_blocks=pool.num_free_blocks,
            num_total_blocks=pool.num_blocks,
            kv_usage=pool.usage,
            prefix_cache_queried_tokens=self.num_queried_tokens,
            prefix_cache_hit_tokens=self.num_hit_tokens,
            num_cached_blocks=self.prefix_cache.num_cached_blocks,
            num_cache_evictions=pool.num_evictions,
            num_sessions=sessions.num_sessions,
            num_pinned_blocks=sessions.num_pinned_blocks,
            num_session_pins_expired=sessions.num_expired,
            num_session_pins_dropped=sessions.num_dropped,
            num_session_pins_closed=sessions.num_closed,
            num_touched_blocks=pool.num_touched_blocks,
            num_evicted_tokens=self.num_evicted_tokens,
        )

    # -------------------------------------------------------------------- reuse

    def match(self, request: Request) -> int:
        """Give a fresh request the KV already held for its leading tokens.

        The longer of the session's pin and the prefix cache wins. Requests that ask for
        prompt logprobs get no hit: the skipped tokens would have none (as in vLLM).
        Returns how many tokens need no computing.
        """
        if request.wants_prompt_logprobs or request.kv_floor:
            return 0  # (a preempted sinks request recomputes its kept window itself)
        cached = self.prefix_cache.match(request)
        pinned, pinned_tokens = self.sessions.match(request, self.block_size)
        if pinned_tokens > len(cached) * self.block_size:
            self.pool.release(reversed(cached))
            request.cache_chain = []  # rebuilt from the pinned blocks at the next commit
            blocks, num_tokens = pinned, pinned_tokens
        else:
            self.pool.release(reversed(pinned))
            request.num_evicted_blocks = 0  # the session pin's layout, if it set one, lost
            blocks, num_tokens = cached, len(cached) * self.block_size
        request.block_ids = list(blocks)
        request.num_computed_tokens = num_tokens
        return num_tokens

    def admitted(self, request: Request, num_reused: int) -> None:
        """Bookkeeping once a request starts running with ``num_reused`` tokens reused."""
        self.num_queried_tokens += request.num_tokens
        self.num_hit_tokens += num_reused
        if request.num_cached_tokens is None:  # a preempted request's recompute does not count
            request.num_cached_tokens = num_reused
        if request.session_id is not None:
            # The new turn supersedes the session's older pin (its blocks, if reused, are
            # now held by the request itself).
            self.sessions.release(request.session_id)
        if not request.num_evicted_blocks or self._slide_commits(request):
            self.prefix_cache.claim(request)  # (one that will not commit claims nothing)

    def commit(self, request: Request) -> None:
        """Record newly computed tokens (their full blocks join the prefix cache).

        A sinks request stops committing once it has rolled blocks out: its table no
        longer maps text blocks one to one, and a prefix hit needs every block from the
        first one on. What it cached before (its first blocks, keyed with its policy in
        the salt) stays valid for requests of the same policy and prefix.

        A sliding-window request keeps committing after releasing blocks while its chain
        covers them: its KV is what any request of the same tokens computes, and the
        released blocks it cached stay in the cache (free, LRU) until their memory is reused."""
        if not request.num_evicted_blocks or self._slide_commits(request):
            self.prefix_cache.commit(request)

    @staticmethod
    def _slide_commits(request: Request) -> bool:
        """Whether a request that released blocks still commits: a sliding-window one (not
        sinks) whose cache chain covers every released block."""
        return not request.rolling and len(request.cache_chain) >= request.num_evicted_blocks

    def roll(self, request: Request) -> int:
        """Release the blocks of a sinks request that no later query can see: whole
        non-sink blocks that end before the window of its next token (one block earlier,
        so that a generation forked from it can recompute its partial last block; an
        input stream keeps ``window`` tokens more, so that a replace may revise its last
        ``window`` tokens). Tokens of a block only partly out are masked by attention, not
        freed. Returns how many blocks were released."""
        if not request.rolling:
            return self._slide(request) if self.sliding_window is not None else 0
        policy, bs = request.kv_policy, self.block_size
        nsb = policy.num_sink_blocks(bs)
        keep_from = policy.window_start(request.num_computed_tokens, request.kv_floor) - bs
        if request.input_only:
            keep_from -= policy.window
        first = nsb + request.num_evicted_blocks
        count = keep_from // bs - first
        if count <= 0:
            return 0
        if not request.num_evicted_blocks:
            self.prefix_cache.forget(request)  # it commits no more: drop its claims
        dropped = request.block_ids[nsb : nsb + count]
        del request.block_ids[nsb : nsb + count]
        self.pool.release(reversed(dropped))
        request.num_evicted_blocks += count
        request.num_evicted_tokens += count * bs
        self.num_evicted_tokens += count * bs
        return count

    def _slide(self, request: Request) -> int:
        """Release the blocks of a request of an all-sliding model that no later query of
        any layer sees: whole blocks ending before the window of its next token (one block
        earlier, so that a generation forked from it can recompute its partial last
        block). An input stream keeps all of its KV (replies fork it, revisions cut it).
        The block table turns logical, as a sinks request's (``Request.physical_block``)."""
        if request.input_only:
            return 0
        bs = self.block_size
        keep_from = request.num_computed_tokens - self.sliding_window + 1 - bs
        count = keep_from // bs - request.num_evicted_blocks
        if count <= 0:
            return 0
        dropped = request.block_ids[:count]
        del request.block_ids[:count]
        self.pool.release(reversed(dropped))
        request.num_evicted_blocks += count
        if not self._slide_commits(request):
            self.prefix_cache.forget(request)  # it commits no more: drop its claims
        request.num_evicted_tokens += count * bs
        self.num_evicted_tokens += count * bs
        return count

    def keep_floor(self, request: Request) -> None:
        """Before a sinks request that rolled blocks out is preempted: remember where its
        kept window begins, so that it is recomputed from what it keeps (its sinks, then
        from there on) rather than from its whole text."""
        if request.rolling and request.num_evicted_blocks:
            nsb = request.kv_policy.num_sink_blocks(self.block_size)
            request.kv_floor = (nsb + request.num_evicted_blocks) * self.block_size

    def skip_to_floor(self, request: Request) -> bool:
        """A recomputing sinks request whose sinks are computed jumps to its floor: the
        blocks in between are never allocated (its table skips them). True if it jumped."""
        floor = request.kv_floor
        computed = request.num_computed_tokens
        if not floor or computed >= floor or computed < request.kv_policy.num_sink_tokens:
            return False
        nsb = request.kv_policy.num_sink_blocks(self.block_size)
        self.prefix_cache.forget(request)  # it commits no more (its table skips blocks)
        request.num_evicted_blocks = floor // self.block_size - nsb
        request.num_computed_tokens = floor
        return True

    def fork(self, child: Request, parent: Request, num_tokens: int) -> int:
        """Let ``child`` reuse the full blocks of ``parent`` covering its first ``num_tokens``.

        Only whole blocks are shared (they are never written again), so no copy-on-write
        is needed; the child recomputes the tokens of the partial last block itself.
        Returns how many tokens the child now has computed. A child of another KV policy
        shares nothing (the layouts differ); a sinks child takes the parent's logical table
        (sink blocks, then the window's blocks) when the shared part ends in the window.
        """
        bs = self.block_size
        child.cache_chain = []
        if child.kv_policy != parent.kv_policy:
            child.block_ids = []
            return 0
        full = num_tokens // bs
        evicted = parent.num_evicted_blocks
        nsb = parent.kv_policy.num_sink_blocks(bs)
        if evicted and full > nsb:
            if full < nsb + evicted:  # ends where the parent keeps nothing: only the sinks
                full, evicted = nsb, 0
            shared = parent.block_ids[: full - evicted]
        else:
            evicted = 0
            shared = parent.block_ids[:full]
        self.pool.share(shared)
        child.block_ids = list(shared)
        child.num_evicted_blocks = evicted
        return full * bs

    def fork_all(self, child: Request, parent: Request) -> tuple[int, int] | None:
        """Let ``child`` share all of ``parent``'s computed KV (a running request forked into
        branches, docs/rl.md): the full blocks are shared, the partial last block is copied
        (copy-on-write: the parent writes it again once joined). Returns the (source,
        destination) block the runner must copy now, if any; ValueError when no block is
        free for that copy. Sets ``child.num_computed_tokens`` to the parent's."""
        bs = self.block_size
        computed = parent.num_computed_tokens
        full, rest = divmod(computed, bs)
        copy = None
        if rest:
            while self.pool.num_free_blocks < 1:
                if not self.sessions.drop_soonest():
                    raise ValueError("no free KV block to fork into: the KV cache is full")
            [dst] = self.pool.allocate(1)
            copy = (parent.block_ids[full], dst)
        shared = parent.block_ids[:full]
        self.pool.share(shared)
        child.block_ids = list(shared) + ([copy[1]] if copy else [])
        child.cache_chain = []
        child.num_computed_tokens = computed
        return copy

    def truncate(self, request: Request, num_tokens: int) -> None:
        """Forget the request's KV from token ``num_tokens`` on (update mode revised its input).

        The KV of the first ``num_tokens`` tokens stays, including the head of a partly kept
        block, which the request then overwrites from ``num_tokens`` on: a block the prefix
        cache knows is taken out of it first. Only when someone else also holds that block
        (a generation forked from it) is it left to them, and the request recomputes the
        block's first tokens into a fresh one.
        """
        bs = self.block_size
        computed = min(request.num_computed_tokens, num_tokens)
        evicted = request.num_evicted_blocks
        if evicted:
            # A sinks request can only recompute from where its window still has the keys.
            first_kept = (request.kv_policy.num_sink_blocks(bs) + evicted) * bs
            if request.kv_policy.window_start(computed - computed % bs, request.kv_floor) < first_kept:
                raise ValueError(
                    f"the revision starts at token {num_tokens}, before the KV window of this "
                    f"kv_policy 'sinks' request (its keys from token {first_kept} on are kept): "
                    "a replace may revise only the last kv_window tokens"
                )
        self.prefix_cache.forget(request)  # its claims were keyed by the old tokens
        del request.block_hashes[num_tokens // bs :]
        keep = blocks_needed(computed, bs) - evicted  # physical blocks kept
        if computed % bs:
            head = request.block_ids[keep - 1]
            if self.pool.ref_count(head) > 1:
                keep -= 1
                computed = (keep + evicted) * bs
            else:
                self.pool.uncache(head)
        self.pool.release(reversed(request.block_ids[keep:]))
        del request.block_ids[keep:]
        del request.cache_chain[computed // bs :]
        request.num_computed_tokens = computed

    def drop_reusable_kv(self) -> None:
        """Forget every session pin and cached prefix (new weights: their KV is stale), so
        no later request can reuse KV computed by other weights."""
        while self.sessions.drop_soonest():
            pass
        self.pool.uncache_all()

    # --------------------------------------------------------------- allocation

    def make_room(self, request: Request, num_new_tokens: int) -> bool:
        """Whether ``num_new_tokens`` more tokens of ``request`` fit, dropping session pins
        (soonest expiry first) if that is what it takes; drops none when even that fails."""
        extra = self._extra_blocks(request, num_new_tokens)
        free = self.pool.num_free_blocks
        if extra <= free:
            return True
        if extra > free + self.sessions.reclaimable_blocks():
            return False
        while self.pool.num_free_blocks < extra and self.sessions.drop_soonest():
            pass
        return extra <= self.pool.num_free_blocks

    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Extend the block table so the next ``num_new_tokens`` tokens have slots.

        Session pins are dropped (soonest expiry first) before giving up: a running request
        outranks an idle session. Returns False (and allocates nothing) when the pool is
        still too small.
        """
        extra = self._extra_blocks(request, num_new_tokens)
        while extra > self.pool.num_free_blocks:
            if not self.sessions.drop_soonest():
                return False
        if extra > 0:
            request.block_ids.extend(self.pool.allocate(extra))
        return True

    # ----------------------------------------------------------------- freeing

    def drop_slots_after(self, request: Request, num_tokens: int) -> None:
        """Give back the blocks past those ``num_tokens`` tokens need (slots of drafted
        tokens that were rejected: no one else holds or caches them)."""
        keep = blocks_needed(num_tokens, self.block_size) - request.num_evicted_blocks
        if len(request.block_ids) > keep:
            self.pool.release(reversed(request.block_ids[keep:]))
            del request.block_ids[keep:]

    def free(self, request: Request) -> None:
        """Give back every block the request holds (shared ones stay with their holders)."""
        self.prefix_cache.forget(request)
        # Last-first, so the LRU evicts a prefix's deepest blocks first.
        self.pool.release(reversed(request.block_ids))
        request.block_ids = []
        request.cache_chain = []
        request.num_evicted_blocks = 0

    def pin_session(self, request: Request, expires_at: float) -> None:
        """Hand a finished request's computed KV to its session's pin until ``expires_at``."""
        num_tokens = request.num_computed_tokens
        evicted = request.num_evicted_blocks
        keep = blocks_needed(num_tokens, self.block_size) - evicted
        self.prefix_cache.forget(request)
        self.pool.release(reversed(request.block_ids[keep:]))
        if keep == 0 or request.session_id is None:
            self.pool.release(reversed(request.block_ids[:keep]))
        else:
            self.sessions.pin(request.session_id, request.block_ids[:keep],
                              request.all_token_ids[:num_tokens], request.cache_salt, expires_at,
                              num_evicted_blocks=evicted)
        request.block_ids = []
        request.cache_chain = []
        request.num_evicted_blocks = 0

    def _extra_blocks(self, request: Request, num_new_tokens: int) -> int:
        needed = blocks_needed(request.num_computed_tokens + num_new_tokens, self.block_size)
        return max(0, needed - request.num_evicted_blocks - len(request.block_ids))
