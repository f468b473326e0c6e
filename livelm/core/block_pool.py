"""A pool of fixed-size KV cache blocks with reference counts and an LRU of cached blocks."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterable


class BlockPool:
    """Hands out physical KV block ids and takes them back when nobody references them.

    A block may be shared (n > 1 sequences forking one prompt, prefix-cache hits, session
    pins): each holder takes a reference. A block nobody holds is free, in one of two tiers:

    - plain free blocks hold nothing worth keeping;
    - cached free blocks still hold a full block of some prefix (``set_cached``); they wait
      in LRU order and are handed out only when no plain block is left, oldest first. The
      ``on_evict`` hook then tells the prefix cache to forget the block's hash.

    Both tiers count as free: a cached block is reused the moment the pool needs it.
    Block ids are indices into the runner's KV tensors.
    """

    def __init__(self, num_blocks: int, on_evict: Callable[[int], None] | None = None) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.on_evict = on_evict
        self.num_evictions = 0
        self._ref_counts = [0] * num_blocks
        self._cached = [False] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        # Blocks ever handed out: on CPU, the KV memory committed (runner/kv_cache.py).
        self._ever_used = bytearray(num_blocks)
        self.num_touched_blocks = 0
        # Insertion order is LRU order: the first key is evicted first.
        self._cached_free: OrderedDict[int, None] = OrderedDict()

    @property
    def num_free_blocks(self) -> int:
        """Blocks nobody holds (plain free plus cached free ones)."""
        return len(self._free) + len(self._cached_free)

    @property
    def num_cached_free_blocks(self) -> int:
        """Free blocks that still hold a cached prefix."""
        return len(self._cached_free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0..1."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def allocate(self, count: int) -> list[int]:
        """Take ``count`` free blocks (reference count 1 each); raises if there are too few.

        Plain free blocks go first; then cached ones are evicted, least recently used first.
        """
        if count > self.num_free_blocks:
            raise RuntimeError(f"asked for {count} KV blocks, only {self.num_free_blocks} free")
        blocks = []
        for _ in range(count):
            if self._free:
                b = self._free.popleft()
            else:
                b, _ = self._cached_free.popitem(last=False)
                self._cached[b] = False
                self.num_evictions += 1
                if self.on_evict is not None:
                    self.on_evict(b)
            self._ref_counts[b] = 1
            if not self._ever_used[b]:
                self._ever_used[b] = 1
                self.num_touched_blocks += 1
            blocks.append(b)
        return blocks

    def share(self, blocks: Iterable[int]) -> None:
        """Add a reference to blocks someone already holds."""
        for b in blocks:
            if self._ref_counts[b] <= 0:
                raise RuntimeError(f"block {b} is free and cannot be shared")
            self._ref_counts[b] += 1

    def touch(self, blocks: Iterable[int]) -> None:
        """Add a reference to cached blocks, taking free ones out of the LRU queue (a hit)."""
        for b in blocks:
            if self._ref_counts[b] == 0:
                if not self._cached[b]:
                    raise RuntimeError(f"block {b} is free and holds no cached prefix")
                del self._cached_free[b]
            self._ref_counts[b] += 1

    def release(self, blocks: Iterable[int]) -> None:
        """Drop one reference to each block; blocks nobody holds become free again.

        Released cached blocks join the LRU queue's tail in the order given, so callers
        pass a request's blocks last-first: a prefix's deepest blocks are evicted first.
        """
        for b in blocks:
            count = self._ref_counts[b] - 1
            if count < 0:
                raise RuntimeError(f"block {b} released more often than taken")
            self._ref_counts[b] = count
            if count == 0:
                if self._cached[b]:
                    self._cached_free[b] = None
                else:
                    # Front of the queue: the next allocation reuses memory already touched,
                    # so a lazily committed cache grows only as far as the traffic needs.
                    self._free.appendleft(b)

    def set_cached(self, block: int) -> None:
        """Mark a held block as holding a cached prefix (it goes to the LRU when freed)."""
        if self._ref_counts[block] <= 0:
            raise RuntimeError(f"block {block} is free and cannot be cached")
        self._cached[block] = True

    def uncache(self, block: int) -> None:
        """Take a held block out of the prefix cache: its holder is about to overwrite it."""
        if self._cached[block]:
            self._cached[block] = False
            if self.on_evict is not None:
                self.on_evict(block)

    def is_cached(self, block: int) -> bool:
        """True while ``block`` is registered in the prefix cache."""
        return self._cached[block]

    def ref_count(self, block: int) -> int:
        """How many holders ``block`` has."""
        return self._ref_counts[block]

    def uncache_all(self) -> int:
        """Take every block out of the prefix cache (cached free blocks become plain free
        ones): what they hold was computed by weights that are gone. Returns how many."""
        count = 0
        for b in range(self.num_blocks):
            if self._cached[b]:
                self.uncache(b)
                count += 1
        for b in self._cached_free:
            self._free.append(b)
        self._cached_free.clear()
        return count
