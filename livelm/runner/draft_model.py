"""Speculative decoding's draft model: a small model with the target's tokenizer, run inside
the engine with its own paged KV cache, drafting for all of a step's requests at once
(the :class:`~livelm.core.speculative.batched.BatchedDrafter` the scheduler's Speculator
calls for ``speculative_method="draft"``; docs/speculative_decoding.md)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from livelm.core.block_pool import BlockPool
from livelm.core.kv_manager import blocks_needed
from livelm.core.scheduler_output import ScheduledChunk
from livelm.core.speculative.batched import DraftItem
from livelm.core.token_ids import common_prefix_len
from livelm.runner.model_runner import ModelRunner

logger = logging.getLogger("livelm")


@dataclass
class _DraftKV:
    """One request's draft KV: its blocks and the tokens whose K/V they hold, in order."""

    block_ids: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    last_used: int = 0  # the propose_batch call that last drafted for it (eviction order)


@dataclass
class _Plan:
    item: DraftItem
    kv: _DraftKV
    start: int  # the first token position the catch-up forward computes


class DraftModelDrafter:
    """Greedy drafts of a draft model, batched across a step's requests.

    ``runner`` holds the draft model and its KV tensors (a :class:`ModelRunner` of its own,
    sized ``num_blocks`` blocks of ``block_size``); the blocks are handed out by this
    drafter's own :class:`BlockPool`, separate from the target's. Per step
    (:meth:`propose_batch`): one forward catches every request's draft KV up on the tokens
    it has not computed yet (the prompt at first, later the tokens accepted since, as
    prefill-style chunks) and yields each first draft token; then ``k - 1`` batched decode
    steps yield the rest. A request's KV is only a cache of ``tokens``: a context that
    differs (after a rejected draft, a revised input) is recomputed from the first token
    that differs, so drafting stays correct whatever happened in between.

    When the pool runs short, the KV of requests not drafting this step goes first (least
    recently drafted first); a request still without room decodes plainly this step.
    """

    def __init__(self, runner: ModelRunner, num_blocks: int, block_size: int) -> None:
        self.runner = runner
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self._kv: dict[str, _DraftKV] = {}
        self._calls = 0
        self.forward_seconds = 0.0  # the draft model's forward passes, over the engine's life
        self.num_forwards = 0
        self.num_no_room = 0  # drafts not made for want of free draft KV blocks

    @property
    def num_blocks(self) -> int:
        """Blocks in the draft model's pool."""
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks of the draft pool nobody holds."""
        return self.pool.num_free_blocks

    @property
    def num_requests(self) -> int:
        """Requests holding draft KV now."""
        return len(self._kv)

    # ---------------------------------------------------------------- protocol

    def propose_batch(self, items: list[DraftItem]) -> dict[str, list[int]]:
        """Up to ``item.limit`` greedy draft tokens for each item's request (absent: no
        room in the draft pool, or the draft model failed; the request decodes plainly)."""
        self._calls += 1
        busy = {it.request_id for it in items}
        plans: list[_Plan] = []
        for it in items:
            if not it.token_ids or it.limit < 1:
                continue
            kv = self._kv.setdefault(it.request_id, _DraftKV())
            kv.last_used = self._calls
            # Keep the longest prefix still valid; the last token is always computed (its
            # logits give the first draft token).
            self._truncate(kv, min(common_prefix_len(kv.tokens, it.token_ids), len(it.token_ids) - 1))
            # K/V are written for the context and every draft token but the last.
            needed = blocks_needed(len(it.token_ids) + it.limit - 1, self.block_size) - len(kv.block_ids)
            if needed > 0:
                if not self._make_room(needed, busy):
                    self.num_no_room += 1
                    continue
                kv.block_ids.extend(self.pool.allocate(needed))
            plans.append(_Plan(it, kv, len(kv.tokens)))
        if not plans:
            return {}
        started = time.perf_counter()
        try:
            return self._run(plans)
        except Exception:  # the draft model's own failure must not fail the requests
            logger.exception("the draft model failed; %d request(s) decode without a draft this step", len(plans))
            for p in plans:
                self.finish(p.item.request_id)
            return {}
        finally:
            self.forward_seconds += time.perf_counter() - started

    def rollback(self, request_id: str, num_tokens: int) -> None:
        """Keep only the K/V of the request's first ``num_tokens`` tokens; whole blocks past
        them go back to the pool (slots past them in a kept block are overwritten later)."""
        kv = self._kv.get(request_id)
        if kv is not None and num_tokens < len(kv.tokens):
            self._truncate(kv, max(0, num_tokens))

    def finish(self, request_id: str) -> None:
        """Free the request's draft KV (it ended, was aborted or preempted)."""
        kv = self._kv.pop(request_id, None)
        if kv is not None and kv.block_ids:
            self.pool.release(reversed(kv.block_ids))

    # ---------------------------------------------------------------- internals

    def _truncate(self, kv: _DraftKV, num_tokens: int) -> None:
        del kv.tokens[num_tokens:]
        keep = blocks_needed(num_tokens, self.block_size)
        if len(kv.block_ids) > keep:
            self.pool.release(reversed(kv.block_ids[keep:]))
            del kv.block_ids[keep:]

    def _make_room(self, needed: int, busy: set[str]) -> bool:
        """Free the draft KV of requests not in ``busy``, least recently drafted first,
        until ``needed`` blocks are free; False if that is not enough."""
        if self.pool.num_free_blocks >= needed:
            return True
        idle = sorted((kv.last_used, rid) for rid, kv in self._kv.items() if rid not in busy and kv.block_ids)
        for _, rid in idle:
            self.finish(rid)
            if self.pool.num_free_blocks >= needed:
                return True
        return False

    def _forward(self, chunks: list[ScheduledChunk]) -> dict[str, int]:
        self.num_forwards += 1
        return self.runner.greedy_tokens(chunks)

    def _run(self, plans: list[_Plan]) -> dict[str, list[int]]:
        """The catch-up forward, then the batched decode steps."""
        first = self._forward([_chunk(p.item.request_id, p.item.token_ids[p.start :], p.start, p.kv)
                               for p in plans])
        drafts = {p.item.request_id: [first[p.item.request_id]] for p in plans}
        for p in plans:
            p.kv.tokens[:] = p.item.token_ids
        for step in range(1, max(p.item.limit for p in plans)):
            active = [p for p in plans if p.item.limit > step]
            out = self._forward([_chunk(p.item.request_id, [drafts[p.item.request_id][-1]],
                                        len(p.item.token_ids) + step - 1, p.kv) for p in active])
            for p in active:
                draft = drafts[p.item.request_id]
                p.kv.tokens.append(draft[-1])  # its K/V were just written
                draft.append(out[p.item.request_id])
        return drafts


def _chunk(request_id: str, token_ids: list[int], start: int, kv: _DraftKV) -> ScheduledChunk:
    """A chunk of the draft model's step (``sample`` marks it as ending at the tokens known,
    so one token becomes a batched decode)."""
    return ScheduledChunk(request_id=request_id, token_ids=token_ids, start_position=start,
                          block_ids=kv.block_ids, sample=True, sampling_params=None,
                          prompt_token_ids=[], output_token_ids=[])
