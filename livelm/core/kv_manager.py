"""Per-request block tables on top of the block pool."""

from __future__ import annotations

from livelm.core.block_pool import BlockPool
from livelm.core.request import Request


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """Blocks that hold ``num_tokens`` token slots."""
    return -(-num_tokens // block_size)


class KVCacheManager:
    """Grows, shares and frees the block table of each request."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks available to new tokens."""
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of the pool in use, 0..1."""
        return self.pool.usage

    def can_fit(self, request: Request, num_new_tokens: int) -> bool:
        """Whether ``num_new_tokens`` more tokens of ``request`` fit in the free blocks."""
        return self._extra_blocks(request, num_new_tokens) <= self.pool.num_free_blocks

    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Extend the block table so the next ``num_new_tokens`` tokens have slots.

        Returns False (and changes nothing) when the pool is too small right now.
        """
        extra = self._extra_blocks(request, num_new_tokens)
        if extra > self.pool.num_free_blocks:
            return False
        if extra > 0:
            request.block_ids.extend(self.pool.allocate(extra))
        return True

    def fork(self, child: Request, parent: Request, num_tokens: int) -> int:
        """Let ``child`` reuse the full blocks of ``parent`` covering its first ``num_tokens``.

        Only whole blocks are shared (they are never written again), so no copy-on-write
        is needed; the child recomputes the tokens of the partial last block itself.
        Returns how many tokens the child now has computed.
        """
        shared = parent.block_ids[: num_tokens // self.block_size]
        self.pool.share(shared)
        child.block_ids = list(shared)
        return len(shared) * self.block_size

    def free(self, request: Request) -> None:
        """Give back every block the request holds."""
        self.pool.release(request.block_ids)
        request.block_ids = []

    def _extra_blocks(self, request: Request, num_new_tokens: int) -> int:
        needed = blocks_needed(request.num_computed_tokens + num_new_tokens, self.block_size)
        return max(0, needed - len(request.block_ids))
