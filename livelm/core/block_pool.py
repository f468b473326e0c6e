"""A pool of fixed-size KV cache blocks with reference counts."""

from __future__ import annotations

from collections import deque


class BlockPool:
    """Hands out physical KV block ids and takes them back when nobody references them.

    A block may be shared (n > 1 sequences forking one prompt, later prefix caching): each
    holder takes a reference, and the block returns to the free queue when the last one
    lets go. Block ids are indices into the runner's KV tensors.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        """Blocks nobody holds."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0..1."""
        return 1.0 - len(self._free) / self.num_blocks

    def allocate(self, count: int) -> list[int]:
        """Take ``count`` free blocks (reference count 1 each); raises if there are too few."""
        if count > len(self._free):
            raise RuntimeError(f"asked for {count} KV blocks, only {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(count)]
        for b in blocks:
            self._ref_counts[b] = 1
        return blocks

    def share(self, blocks: list[int]) -> None:
        """Add a reference to blocks someone already holds."""
        for b in blocks:
            if self._ref_counts[b] <= 0:
                raise RuntimeError(f"block {b} is free and cannot be shared")
            self._ref_counts[b] += 1

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block; blocks nobody holds become free again."""
        for b in blocks:
            count = self._ref_counts[b] - 1
            if count < 0:
                raise RuntimeError(f"block {b} released more often than taken")
            self._ref_counts[b] = count
            if count == 0:
                self._free.append(b)

    def ref_count(self, block: int) -> int:
        """How many holders ``block`` has."""
        return self._ref_counts[block]
