"""Automatic prefix caching: full KV blocks found again by a hash chained over their prefix.

Block ``i`` of a request is keyed by ``hash_fn(key of block i-1, its token ids, salt)``, so a
key stands for the whole prefix up to the block's end, and two salts never share a key. A
block found under a key is only a candidate: every hit is verified against what the cached
block really holds (its token ids, its salt, and the content id of the block before it),
so a hash collision costs a look at one more candidate, never wrong KV. Content ids are
never reused, which keeps the chain check exact even after a parent block was evicted and
its id refilled with other tokens.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from livelm.core.block_pool import BlockPool
from livelm.core.request import Request

BlockHashFn = Callable[[int | None, tuple[int, ...], str | None], int]


def default_block_hash(parent: int | None, token_ids: tuple[int, ...], salt: str | None) -> int:
    """Python's tuple hash: fast, and good enough because every hit is verified."""
    return hash((parent, salt, token_ids))


@dataclass(frozen=True, slots=True)
class CachedBlock:
    """What a cached block holds: enough to verify a hit without trusting the hash."""

    block_hash: int
    content_id: int
    parent_id: int | None  # content id of the previous block of the prefix
    token_ids: tuple[int, ...]
    salt: str | None
    block_id: int

    def holds(self, parent_id: int | None, token_ids: tuple[int, ...], salt: str | None) -> bool:
        """True when this block's KV is exactly that of ``token_ids`` after ``parent_id``."""
        return self.parent_id == parent_id and self.token_ids == token_ids and self.salt == salt


class PrefixCache(Protocol):
    """Finds and registers full KV blocks by prefix (the policy the KV manager consults)."""

    num_collisions: int

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the cache (held or free)."""
        ...

    def match(self, request: Request) -> list[int]:
        """Take a reference to the cached leading full blocks of the request's tokens.

        The request's last token is never covered, so its logits always get computed.
        """
        ...

    def commit(self, request: Request) -> None:
        """Register the request's newly computed full blocks."""
        ...

    def claim(self, request: Request) -> None:
        """Note the full blocks an admitted request is about to compute."""
        ...

    def forget(self, request: Request) -> None:
        """Drop the request's claims (it was preempted, or it finished)."""
        ...

    def waits_for_producer(self, request: Request) -> bool:
        """True when a running request is computing the next block this one could hit."""
        ...

    def on_evict(self, block: int) -> None:
        """The pool reused a cached free block: forget what it held."""
        ...


class NoPrefixCache:
    """Prefix caching switched off: nothing is found, nothing is kept."""

    num_collisions = 0
    num_cached_blocks = 0

    def match(self, request: Request) -> list[int]:
        """No hit, ever."""
        return []

    def commit(self, request: Request) -> None:
        """Nothing to register."""

    def claim(self, request: Request) -> None:
        """Nothing to claim."""

    def forget(self, request: Request) -> None:
        """Nothing to forget."""

    def waits_for_producer(self, request: Request) -> bool:
        """Never waits: without a cache there is nothing to wait for."""
        return False

    def on_evict(self, block: int) -> None:
        """No block is ever cached."""


class HashPrefixCache:
    """The chained-hash prefix cache over a :class:`BlockPool`.

    Each key maps to a small bucket of blocks, so a collision (or a stale block whose
    prefix was evicted and recomputed) costs a look at one more candidate, never a wrong
    hit or a block that cannot be cached. ``hash_fn`` may be swapped: tests force every key
    to collide, and hits stay correct. Blocks two requests computed at the same time keep
    one entry; the other copy is simply freed later.
    """

    def __init__(self, pool: BlockPool, block_size: int, hash_fn: BlockHashFn = default_block_hash) -> None:
        self.pool = pool
        self.block_size = block_size
        self.hash_fn = hash_fn
        self.num_collisions = 0
        self._by_hash: dict[int, list[int]] = {}
        self._meta: dict[int, CachedBlock] = {}
        self._content_ids = itertools.count()
        # Key -> id of the running request that will compute that block: later requests
        # with the same prefix wait for it rather than computing the same KV twice.
        self._pending: dict[int, str] = {}

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the cache (held or free)."""
        return len(self._meta)

    # --------------------------------------------------------------------- lookup

    def block_hashes(self, request: Request, num_blocks: int) -> list[int]:
        """The keys of the request's first ``num_blocks`` full blocks (computed once)."""
        hashes = request.block_hashes
        bs = self.block_size
        tokens = request.all_token_ids
        while len(hashes) < num_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(self.hash_fn(parent, tuple(tokens[i * bs : (i + 1) * bs]), request.cache_salt))
        return hashes

    def _find(self, block_hash: int, parent: int | None, token_ids: tuple[int, ...],
              salt: str | None) -> CachedBlock | None:
        """The cached block under ``block_hash`` that really holds this content, if any."""
        for block in self._by_hash.get(block_hash, ()):
            meta = self._meta[block]
            if meta.holds(parent, token_ids, salt):
                return meta
            self.num_collisions += 1
        return None

    def match(self, request: Request) -> list[int]:
        """See :meth:`PrefixCache.match`; sets ``request.cache_chain`` to the hit's ids."""
        bs = self.block_size
        max_blocks = (request.num_tokens - 1) // bs
        hashes = self.block_hashes(request, max_blocks)
        tokens = request.all_token_ids
        blocks: list[int] = []
        chain: list[int] = []
        parent: int | None = None
        for i in range(max_blocks):
            meta = self._find(hashes[i], parent, tuple(tokens[i * bs : (i + 1) * bs]), request.cache_salt)
            if meta is None:
                break
            blocks.append(meta.block_id)
            chain.append(meta.content_id)
            parent = meta.content_id
        self.pool.touch(blocks)
        request.cache_chain = chain
        return blocks

    def waits_for_producer(self, request: Request) -> bool:
        """See :meth:`PrefixCache.waits_for_producer` (an unverified look: cheap, and a
        collision only makes a request wait for a block it then recomputes)."""
        max_blocks = (request.num_tokens - 1) // self.block_size
        for h in self.block_hashes(request, max_blocks):
            owner = self._pending.get(h)
            if owner is not None and owner != request.request_id:
                return True
            if h not in self._by_hash:
                return False
        return False

    # ---------------------------------------------------------------- registering

    def commit(self, request: Request) -> None:
        """See :meth:`PrefixCache.commit`."""
        bs = self.block_size
        # Text block i is request.physical_block(i): a sliding-window request that released
        # blocks commits on while its chain covers them (KVCacheManager.commit).
        num_full = min(request.num_computed_tokens // bs, len(request.block_ids) + request.num_evicted_blocks)
        chain = request.cache_chain
        if len(chain) >= num_full:
            return
        hashes = self.block_hashes(request, num_full)
        tokens = request.all_token_ids
        salt = request.cache_salt
        for i in range(len(chain), num_full):
            h = hashes[i]
            token_ids = tuple(tokens[i * bs : (i + 1) * bs])
            parent = chain[-1] if chain else None
            block = request.physical_block(i, bs)
            meta = self._meta.get(block)
            if meta is not None and not meta.holds(parent, token_ids, salt):
                # Cannot happen while blocks are written only past the cached part; if it
                # ever did, caching nothing more for this request is the safe answer.
                self.forget(request)
                return
            if meta is None:
                meta = self._find(h, parent, token_ids, salt)  # computed twice: keep one
            if meta is None:
                meta = CachedBlock(h, next(self._content_ids), parent, token_ids, salt, block)
                self._meta[block] = meta
                self._by_hash.setdefault(h, []).append(block)
                self.pool.set_cached(block)
            chain.append(meta.content_id)
            if self._pending.get(h) == request.request_id:
                del self._pending[h]

    def claim(self, request: Request) -> None:
        """See :meth:`PrefixCache.claim`."""
        first = request.num_computed_tokens // self.block_size
        hashes = self.block_hashes(request, request.num_tokens // self.block_size)
        for h in hashes[first:]:
            if h not in self._by_hash:
                self._pending.setdefault(h, request.request_id)

    def forget(self, request: Request) -> None:
        """See :meth:`PrefixCache.forget`."""
        rid = request.request_id
        for h in request.block_hashes:
            if self._pending.get(h) == rid:
                del self._pending[h]

    def on_evict(self, block: int) -> None:
        """See :meth:`PrefixCache.on_evict`."""
        meta = self._meta.pop(block, None)
        if meta is None:
            return
        bucket = self._by_hash[meta.block_hash]
        bucket.remove(block)
        if not bucket:
            del self._by_hash[meta.block_hash]
