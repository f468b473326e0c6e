"""Continuous batching under one token budget per step (pure Python, no torch)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

from livelm.config import CacheConfig, SchedulerConfig
from livelm.core.kv_manager import KVCacheManager, KVCacheStats, blocks_needed
from livelm.core.request import FinishReason, Request, RequestStatus
from livelm.core.scheduler_output import (
    ModelRunnerOutput,
    SampledToken,
    ScheduledChunk,
    SchedulerOutput,
    SequenceUpdate,
)
from livelm.core.scheduling_policy import FcfsPolicy, SchedulingPolicy, make_policy
from livelm.core.speculative.batched import BatchedDrafter
from livelm.core.speculative.config import SpeculativeConfig
from livelm.core.speculative.speculator import SpeculativeStats, Speculator
from livelm.core.step_cost import StepCostModel, StepShape
from livelm.core.token_ids import common_prefix_len


class SchedulerStats(NamedTuple):
    """The scheduler's load, with that of its KV cache (a tuple, like KVCacheStats)."""

    num_running: int
    num_waiting: int
    num_preemptions: int
    num_input_streams: int  # input-only requests (open input streams)
    num_computed_tokens: int
    kv: KVCacheStats
    slo: SloStats | None = None
    spec: SpeculativeStats | None = None


class SloStats(NamedTuple):
    """How the latency targets fared (docs/scheduling.md)."""

    num_tpot_misses: int  # steps with decodes under a TPOT target that took longer
    num_ttft_misses: int  # requests whose first token came after their TTFT deadline
    num_capped_steps: int  # steps whose prefill the TPOT target cut short
    num_floor_steps: int  # steps that ran the minimum prefill past the TPOT headroom
    predicted_step_s: float  # the cost model's prediction for the last step sized to a target (else 0)
    measured_step_s: float  # the last step's measured time


class Scheduler:
    """Decides, step by step, which requests compute how many tokens.

    Every request simply catches up to its known tokens: a decoding request needs one
    token, a fresh (or preempted, or forked) one needs a chunk of its prompt. Running
    requests are served first, oldest first, so decodes are never starved by prefills;
    what budget is left admits waiting requests. A waiting request first takes the KV
    that already exists for its leading tokens (its session's pin or the prefix cache),
    and waits while a running request is computing a prefix it shares. When the KV pool
    runs dry, session pins are dropped first; then the newest running request is
    preempted (its blocks released, recomputed later).

    The order is the policy's (core/scheduling_policy.py; the above is ``fcfs``): which
    waiting request is admitted first, which prefill takes the budget first, who yields.
    With a TPOT target, the prefill of a step that also decodes is cut to what the cost
    model (core/step_cost.py, learnt from ``observe_step``) says fits in the target.
    Speculative decoding (``speculative``, and requests' own overrides): a decoding
    request may also compute tokens its drafter guessed, counted in the token budget, if
    the KV pool has room for them without reclaiming anything; :meth:`update` keeps the
    tokens the runner accepted and gives back the blocks only rejected tokens used.
    """

    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        clock: Callable[[], float] = time.monotonic,
        speculative: SpeculativeConfig | None = None,
        drafter: BatchedDrafter | None = None,
        sliding_window: int | None = None,
    ) -> None:
        self.config = scheduler_config
        self.block_size = cache_config.block_size
        # sliding_window: every layer of the model slides by it, so KV before a request's
        # window is released as it moves on (KVCacheManager.roll).
        self.kv = KVCacheManager(
            cache_config.num_blocks, cache_config.block_size, cache_config.enable_prefix_caching, sliding_window
        )
        self.session_ttl = cache_config.session_ttl_s
        # Session TTLs read this clock; tests replace it to move time without sleeping.
        self.clock = clock
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._finished_ids: list[str] = []
        self.num_preemptions = 0
        self.num_computed_tokens = 0  # every token computed, over the scheduler's life
        self.num_input_streams = 0  # input-only requests now (counted, so stats stay O(1))
        # A weight update in "wait" mode (docs/rl.md): requests that have not started yet
        # stay waiting until the update is applied.
        self.hold_new_requests = False
        # Requests forked into branches (docs/rl.md): out of the running set, holding their
        # KV until joined.
        self.suspended: dict[str, Request] = {}
        self.policy: SchedulingPolicy = make_policy(scheduler_config.policy)
        self._reorders = type(self.policy) is not FcfsPolicy  # fcfs keeps the queues as they are
        self.step_cost = StepCostModel()
        self._tpot_default = None if scheduler_config.tpot_slo_ms is None else scheduler_config.tpot_slo_ms / 1000
        self._ttft_default = None if scheduler_config.ttft_slo_ms is None else scheduler_config.ttft_slo_ms / 1000
        self._step_target: float | None = None  # the TPOT target the last schedule() sized for
        self._predicted = 0.0
        self._measured = 0.0
        self.num_tpot_misses = 0
        self.num_ttft_misses = 0
        self.num_capped_steps = 0
        self.num_floor_steps = 0
        self.speculator = Speculator(speculative or SpeculativeConfig(), drafter)

    # ----------------------------------------------------------------- admission

    @property
    def kv_capacity_tokens(self) -> int:
        """Token slots in the whole pool."""
        return self.kv.capacity_tokens

    def add_request(self, request: Request) -> None:
        """Queue a request (validated by the caller against the model's limits)."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if request.priority and abs(request.priority) > self.config.max_priority:
            raise ValueError(f"priority must be an integer from {-self.config.max_priority} to "
                             f"{self.config.max_priority} (the engine's max_priority), got {request.priority}")
        if request.ttft_slo is None:
            request.ttft_slo = self._ttft_default
        if self.kv.sliding_window is not None and not request.input_only and not request.rolling:
            request.sliding_window = self.kv.sliding_window  # an input stream keeps all its KV
        self.requests[request.request_id] = request
        self.waiting.append(request)
        self.policy.added(request)
        if request.input_only:
            self.num_input_streams += 1

    def has_unfinished(self) -> bool:
        """True while any request is waiting or running."""
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        """Requests not yet running (including preempted ones)."""
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        """Requests holding KV and being computed."""
        return len(self.running)

    def stats(self) -> SchedulerStats:
        """The load now."""
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            num_preemptions=self.num_preemptions,
            num_input_streams=self.num_input_streams,
            num_computed_tokens=self.num_computed_tokens,
            kv=self.kv.stats(),
            slo=SloStats(self.num_tpot_misses, self.num_ttft_misses, self.num_capped_steps, self.num_floor_steps,
                         self._predicted, self._measured),
            spec=self.speculator.stats(),
        )

    # ------------------------------------------------------------------ schedule

    def schedule(self) -> SchedulerOutput:
        """Pick this step's work within ``max_num_batched_tokens`` and the KV pool."""
        now = self.clock()
        self.kv.sessions.expire(now)
        budget = self.config.max_num_batched_tokens
        chunks: dict[str, ScheduledChunk] = {}
        preempted = False

        # Decodes first, then prefill chunks (in the policy's order; oldest first under
        # fcfs): a long prompt, or input streaming into a session, never takes the budget
        # from a token being generated.
        decoding = [r for r in self.running if r.num_tokens - r.num_computed_tokens == 1]
        catching_up = [r for r in self.running if r.num_tokens - r.num_computed_tokens > 1]
        if self._reorders and len(catching_up) > 1:
            catching_up = self.policy.prefill_order(catching_up, now)
        catching_up_ids = {r.request_id for r in catching_up} if self._reorders else set()
        self._step_target = self._tpot_target(decoding)
        limit = _PrefillLimit(self, self._step_target)
        # A batch of many decodes is compute-bound: verifying drafts would cost more than
        # the weight reads it saves.
        speculate = len(decoding) <= self.speculator.config.max_batch_decodes and self._speculation_pays(decoding)
        # Draft-model requests are drafted together, in one batched forward of the draft model.
        batched = self._batched_drafts(decoding, budget) if speculate else {}
        for req in decoding + catching_up:
            if budget <= 0:
                break
            if req.status == RequestStatus.PREEMPTED:
                continue  # a victim of an earlier request in this loop
            if self._reorders and not preempted and req.request_id in catching_up_ids:
                # Waiting requests the policy ranks ahead of this prefill go first: a light
                # tenant's (or an urgent) new request does not wait behind others' prompts.
                budget = self._admit_waiting(chunks, budget, limit, now, before=self.policy.rank(req))
                if budget <= 0:
                    break
            n = _chunk_len(req, budget)
            if n > 1:
                n = limit.allow(req.num_computed_tokens, n)
                if n == 0:
                    continue
            if speculate and n == 1 and budget > 1:
                draft = self._draft(req, budget - 1, batched)
                if draft:
                    chunks[req.request_id] = self._chunk(req, 1, draft)
                    limit.add(req.num_computed_tokens, 1 + len(draft))
                    budget -= 1 + len(draft)
                    continue
            while not self.kv.allocate_slots(req, n):
                victim = self.policy.victim(self.running)  # the newest request, under fcfs
                self.running.remove(victim)
                self._preempt(victim)
                preempted = True
                undone = chunks.pop(victim.request_id, None)
                if undone is not None:
                    budget += undone.num_tokens
                if victim is req:
                    break
            else:
                chunks[req.request_id] = self._chunk(req, n)
                limit.add(req.num_computed_tokens, n)
                budget -= n
        for rid in batched:
            # A draft made but not scheduled (no budget or free blocks left, preempted):
            # the draft model keeps only the request's known tokens.
            chunk = chunks.get(rid)
            req = self.requests.get(rid)
            if req is not None and (chunk is None or not chunk.draft_token_ids):
                self.speculator.rollback(req, req.num_tokens)

        # New work only when nothing had to yield this step (it would just thrash).
        if not preempted:
            budget = self._admit_waiting(chunks, budget, limit, now)
        scheduled = list(chunks.values())
        limit.finish()
        self._predicted = limit.predicted()

        finished, self._finished_ids = self._finished_ids, []
        return SchedulerOutput(chunks=scheduled, finished_request_ids=finished)

    def _tpot_target(self, decoding: list[Request]) -> float | None:
        """The TPOT target this step's decodes ask for: the tightest of theirs (None when
        no decode has one, or nothing decodes)."""
        target = None
        for req in decoding:
            t = req.tpot_slo if req.tpot_slo is not None else self._tpot_default
            if t is not None and (target is None or t < target):
                target = t
        return target

    def observe_step(self, scheduled: SchedulerOutput, seconds: float) -> None:
        """The engine measured ``seconds`` for the step ``scheduled``: the cost model learns
        from it, and a step over the TPOT target it was sized for counts as a miss."""
        shape = StepShape.of_chunks((c.start_position, c.num_tokens) for c in scheduled.chunks)
        self.step_cost.observe(shape, seconds)
        self._measured = seconds
        if self._step_target is not None and seconds > self._step_target:
            self.num_tpot_misses += 1

    def has_pending_work(self) -> bool:
        """True while a step would compute something (or could admit a waiting request);
        streams that wait for input hold KV but need no steps."""
        return bool(self.waiting) or any(r.num_computed_tokens < r.num_tokens for r in self.running)

    def _admit_waiting(self, chunks: dict[str, ScheduledChunk], budget: int, limit: _PrefillLimit, now: float,
                       before: object = None) -> int:
        """Admit waiting requests (in the policy's order) while budget, KV and batch slots
        last; ``before``: only those the policy ranks strictly ahead of it."""
        skipped: list[Request] = []
        if self._reorders and len(self.waiting) > 1:
            self.waiting = deque(self.policy.admission_order(self.waiting, now))
        # Input streams do not count: waiting for input, they hold KV but take no batch slot.
        num_seqs = sum(not r.input_only for r in self.running)
        while self.waiting and budget > 0 and not limit.exhausted:
            if before is not None and not self.policy.rank(self.waiting[0]) < before:
                break
            if num_seqs >= self.config.max_num_seqs and not self.waiting[0].input_only:
                break
            req = self.waiting.popleft()
            if self.hold_new_requests and _is_fresh(req):
                skipped.append(req)  # a "wait" weight update holds it until applied
                continue
            if req.fork_from is not None and not self._try_fork(req):
                skipped.append(req)  # its prompt is still being computed by the first sequence
                continue
            reused = 0
            if not req.block_ids:
                if self.kv.prefix_cache.waits_for_producer(req):
                    skipped.append(req)  # a running request is computing the prefix it shares
                    continue
                reused = self.kv.match(req)
                self.kv.skip_to_floor(req)  # no sinks to recompute first
            remaining = req.num_tokens - req.num_computed_tokens
            # Admit only if the whole remaining prompt fits now: a request admitted on its
            # first chunk alone would soon be preempted again, wasting the work. A sinks
            # request never holds more than its window (and a chunk) at once.
            peak = _peak_tokens(req, remaining + 1, self.block_size)
            n = _chunk_len(req, budget)
            if n > 1:
                n = limit.allow(req.num_computed_tokens, n)
            fits = n > 0 or remaining == 0
            fits = fits and self.kv.make_room(req, peak)
            while n > 0 and not fits and (victim := self.policy.may_preempt_for(req, self.running)) is not None:
                # The priority policy: a lower-priority request yields its KV to this one.
                self.running.remove(victim)
                self._preempt(victim)
                self.waiting.remove(victim)
                skipped.append(victim)
                undone = chunks.pop(victim.request_id, None)
                if undone is not None:
                    budget += undone.num_tokens
                num_seqs -= not victim.input_only
                fits = self.kv.make_room(req, peak)
            if not fits:
                self.kv.free(req)
                req.num_computed_tokens = 0
                self.waiting.appendleft(req)
                break
            self.kv.allocate_slots(req, n)
            self.kv.admitted(req, reused)
            req.status = RequestStatus.RUNNING
            if req.first_scheduled_time is None:
                req.first_scheduled_time = time.monotonic()
            self.running.append(req)
            num_seqs += not req.input_only
            if n > 0:
                chunks[req.request_id] = self._chunk(req, n)
                limit.add(req.num_computed_tokens, n)
                budget -= n
            else:  # a stream whose input is all computed (or has not started)
                req.status = RequestStatus.WAITING_FOR_INPUT
        self.waiting.extendleft(reversed(skipped))
        return budget

    def _try_fork(self, child: Request) -> bool:
        """Share the parent's KV of the tokens ``child`` starts with; False means "not yet".

        The parent is sequence 0 of an n > 1 request, or the input stream a generation
        replies to. The child waits while a running parent is still computing those tokens.
        """
        parent = self.requests.get(child.fork_from or "")
        if parent is None or parent.status not in _HOLDS_KV:
            if parent is not None and parent.status == RequestStatus.WAITING and parent.num_preemptions == 0:
                return False
            child.fork_from = None  # the parent cannot share any more: prefill alone
            return True
        shared = common_prefix_len(parent.all_token_ids, child.all_token_ids, child.num_tokens - 1)
        if parent.num_computed_tokens < shared:
            return False
        child.fork_from = None
        child.num_computed_tokens = self.kv.fork(child, parent, shared)
        return True

    def _speculation_pays(self, decoding: list[Request]) -> bool:
        """Whether drafts this step are expected to yield tokens faster than plain decoding,
        by the step cost model of this host: a decode step of the batch as it is, against
        one whose speculating requests verify a draft of the mean draft length, which
        yields (1 + acceptance x length) tokens each. Part of ``adaptive``; True for a
        single decode and until the model is ready (the configured rule alone decides)."""
        cost = self.step_cost
        spec = self.speculator
        if not spec.config.adaptive or not cost.ready or len(decoding) < 2:
            return True  # a single stream is never compute-bound by its drafts
        drafts = [spec.method_of(r) is not None for r in decoding]
        num_drafting = sum(drafts)
        if not num_drafting:
            return True
        stats = spec.stats()
        length = (stats.num_draft_tokens / stats.num_drafts if stats.num_drafts
                  else float(spec.config.num_speculative_tokens))
        acceptance = stats.num_accepted_tokens / stats.num_draft_tokens if stats.num_draft_tokens else 0.5
        k = max(1, round(length))
        plain = cost.predict(StepShape.of_chunks((r.num_computed_tokens, 1) for r in decoding))
        verify = cost.predict(StepShape.of_chunks(
            (r.num_computed_tokens, 1 + k if d else 1) for r, d in zip(decoding, drafts, strict=True)))
        tokens = len(decoding) + num_drafting * acceptance * length
        return verify * len(decoding) < plain * tokens  # seconds per token, cross-multiplied

    def _draft_limit(self, req: Request, budget: int) -> int:
        """The most tokens decoding request ``req`` may draft now (0: it does not speculate)."""
        params = req.sampling_params
        if params is None or params.structured is not None or not req.input_closed or req.rolling:
            return 0  # a sinks request's rolling block table is not rolled back here
        limit = min(budget, self.config.max_model_len - req.num_tokens)
        if params.max_tokens is not None:
            limit = min(limit, params.max_tokens - req.num_output_tokens - 1)
        if limit < 1 or self.speculator.method_of(req) is None:
            return 0
        return limit

    def _batched_drafts(self, decoding: list[Request], budget: int) -> dict[str, list[int]]:
        """The drafts of this step's draft-model requests, from one call of the batched
        drafter. Each decode takes a token of the budget first; what is left is handed to
        the drafts in the decodes' order (the order the loop serves them in)."""
        if self.speculator.batched is None:
            return {}
        room = budget - len(decoding)
        wanted = [(req, limit) for req in decoding
                  if self.speculator.is_batched(req) and (limit := self._draft_limit(req, room)) > 0]
        return self.speculator.propose_batch(wanted, room) if wanted else {}

    def _draft(self, req: Request, budget: int, batched: dict[str, list[int]]) -> tuple[int, ...]:
        """Tokens drafted for decoding request ``req`` (at most ``budget``), their slots
        allocated; empty when it does not speculate now or the pool has no free room.
        A draft-model request's draft was made for the whole step (``batched``)."""
        if self.speculator.is_batched(req):
            draft = batched.get(req.request_id, [])[: self._draft_limit(req, budget)]
        else:
            limit = self._draft_limit(req, budget)
            draft = self.speculator.propose(req, limit) if limit else []
        if not draft:
            return ()
        # Only free blocks: drafts never cost a session pin, let alone a preemption.
        needed = (blocks_needed(req.num_computed_tokens + 1 + len(draft), self.block_size)
                  - req.num_evicted_blocks - len(req.block_ids))
        if needed > self.kv.num_free_blocks or not self.kv.allocate_slots(req, 1 + len(draft)):
            return ()
        return tuple(draft)

    def _chunk(self, req: Request, n: int, draft: tuple[int, ...] = ()) -> ScheduledChunk:
        start = req.num_computed_tokens
        want_prompt_lp = (
            req.wants_prompt_logprobs
            and not req.output_token_ids
            and start < req.num_prompt_tokens
        )
        return ScheduledChunk(
            request_id=req.request_id,
            token_ids=req.all_token_ids[start : start + n] + list(draft),
            start_position=start,
            block_ids=req.block_ids,
            sample=start + n == req.num_tokens and req.input_closed and not req.input_only,
            sampling_params=req.sampling_params,
            prompt_token_ids=req.prompt_token_ids,
            output_token_ids=req.output_token_ids,
            seed_offset=req.index,
            want_prompt_logprobs=want_prompt_lp,
            kv_policy=req.kv_policy if req.rolling else None,
            num_evicted_blocks=req.num_evicted_blocks,
            kv_floor=req.kv_floor,
            draft_token_ids=draft,
        )

    def _preempt(self, req: Request) -> None:
        self.kv.keep_floor(req)  # a sinks request is recomputed from what it keeps
        self.kv.free(req)
        self.speculator.preempted(req)  # a draft model's KV goes too
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    # -------------------------------------------------------------------- update

    def update(
        self, scheduled: SchedulerOutput, result: ModelRunnerOutput
    ) -> list[SequenceUpdate]:
        """Advance requests by what the runner computed and sampled; report to the frontend."""
        outputs: list[SequenceUpdate] = []
        for chunk in scheduled.chunks:
            req = self.requests.get(chunk.request_id)
            if req is None or req.is_finished:
                continue
            if chunk.draft_token_ids:
                outputs.append(self._update_speculative(req, chunk, result.spec_sampled[req.request_id]))
                continue
            req.num_computed_tokens += chunk.num_tokens
            self.num_computed_tokens += chunk.num_tokens
            self.kv.commit(req)
            self.kv.skip_to_floor(req)
            self.policy.account(req, 0 if chunk.is_decode else chunk.num_tokens, 1 if chunk.sample else 0)
            self.kv.roll(req)
            prompt_lp = result.prompt_logprobs.get(req.request_id)
            if not chunk.sample:
                if req.input_only and req.num_computed_tokens == req.num_tokens:
                    req.status = RequestStatus.WAITING_FOR_INPUT
                if prompt_lp is not None:
                    outputs.append(self._output(req, [], None, prompt_lp))
                continue
            sampled = result.sampled[req.request_id]
            if not req.output_token_ids:
                self._first_token(req)
            req.append_output(sampled.token_id)
            self._check_stop(req, sampled.token_id)
            lps = [sampled] if req.sampling_params.logprobs is not None else None
            update = self._output(req, [sampled.token_id], lps, prompt_lp)
            if sampled.sampling_logprob is not None:
                update.sampling_logprobs = [sampled.sampling_logprob]
            outputs.append(update)
            if req.is_finished:
                self._release(req)
        return outputs

    def _first_token(self, req: Request) -> None:
        req.first_token_time = now = self.clock()
        deadline = req.ttft_deadline
        if deadline is not None and now > deadline:
            self.num_ttft_misses += 1

    def _update_speculative(self, req: Request, chunk: ScheduledChunk, tokens: list[SampledToken]) -> SequenceUpdate:
        """Keep the drafted tokens the runner accepted and the one it sampled after them,
        up to the first that ends the request; the KV of the rest is dropped."""
        kept: list[SampledToken] = []
        for tok in tokens:
            req.append_output(tok.token_id)
            kept.append(tok)
            self._check_stop(req, tok.token_id)
            if req.is_finished:
                break
        # The last kept token has no KV yet (as after a plain decode); every other one
        # was computed as the draft it equals.
        req.num_computed_tokens = chunk.start_position + len(kept)
        self.num_computed_tokens += chunk.num_tokens
        self.speculator.record(req, len(chunk.draft_token_ids), len(tokens) - 1)
        self.speculator.rollback(req, req.num_computed_tokens)  # a draft model keeps what the target kept
        self.kv.drop_slots_after(req, req.num_tokens)
        self.kv.commit(req)
        self.kv.roll(req)  # a sliding-window request releases what left its window
        self.policy.account(req, 0, len(kept))
        lps = kept if req.sampling_params.logprobs is not None else None
        update = self._output(req, [t.token_id for t in kept], lps, None)
        if req.sampling_params.sampling_logprobs:
            update.sampling_logprobs = [t.sampling_logprob for t in kept]
        if req.is_finished:
            self._release(req)
        return update

    def _check_stop(self, req: Request, token_id: int) -> None:
        params = req.sampling_params
        num_out = req.num_output_tokens
        if num_out >= params.min_tokens:
            if not params.ignore_eos and token_id in req.eos_token_ids:
                self._mark_finished(req, FinishReason.STOP, None)
                return
            if token_id in params.stop_token_ids:
                self._mark_finished(req, FinishReason.STOP, token_id)
                return
        max_tokens = params.max_tokens
        if (max_tokens is not None and num_out >= max_tokens) or (
            req.num_tokens >= self.config.max_model_len and not req.rolling  # a window never fills up
        ):
            self._mark_finished(req, FinishReason.LENGTH, None)

    @staticmethod
    def _mark_finished(req: Request, reason: FinishReason, stop_reason: int | str | None) -> None:
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.stop_reason = stop_reason

    @staticmethod
    def _output(req: Request, tokens, lps, prompt_lp) -> SequenceUpdate:
        return SequenceUpdate(
            request_id=req.request_id,
            parent_id=req.parent_id or req.request_id,
            index=req.index,
            new_token_ids=tokens,
            new_logprobs=lps,
            prompt_logprobs=prompt_lp,
            finish_reason=req.finish_reason,
            stop_reason=req.stop_reason,
            num_cached_tokens=req.num_cached_tokens or 0,
        )

    # ------------------------------------------------------------------- finish

    def finish_request(
        self, request_id: str, reason: FinishReason = FinishReason.ABORT, stop_reason=None
    ) -> Request | None:
        """Stop a request now (abort, or a stop string seen by the frontend); frees its KV."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        if not req.is_finished:
            self._mark_finished(req, reason, stop_reason)
        self._release(req)
        return req

    def _release(self, req: Request) -> None:
        self.speculator.finish(req)
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        else:
            self.suspended.pop(req.request_id, None)
        ttl = req.session_ttl if req.session_ttl is not None else self.session_ttl
        if req.session_id is not None and ttl > 0 and req.finish_reason in _PINNED_FINISHES:
            self.kv.pin_session(req, self.clock() + ttl)
        else:
            self.kv.free(req)
        if self.requests.pop(req.request_id, None) is not None:
            self.policy.finished(req)
            if req.input_only:
                self.num_input_streams -= 1
        self._finished_ids.append(req.request_id)

    # ------------------------------------------------------------ streaming input

    def update_input(self, request_id: str, keep: int, append: list[int], close: bool = False) -> Request:
        """Revise a stream's input: keep its first ``keep`` tokens, then ``append``
        (``close``: no more input will come).

        KV computed for the kept tokens stays; everything from the first changed token is
        computed again, in the background, by the steps that follow.
        """
        req = self.requests.get(request_id)
        if req is None or not req.input_only:
            raise KeyError(f"no input stream {request_id!r}")
        if keep < req.num_tokens:
            self.kv.truncate(req, keep)
            req.truncate_input(keep)
        req.append_input(append)
        req.input_closed = req.input_closed or close
        if req.status == RequestStatus.WAITING_FOR_INPUT and req.num_computed_tokens < req.num_tokens:
            req.status = RequestStatus.RUNNING
        return req

    # ------------------------------------------------------------ weight updates

    def has_started_requests(self) -> bool:
        """True while a generation request holds KV or has output (a "wait" update waits
        for these to finish; input streams do not count)."""
        return any(not r.input_only for r in self.running) or any(
            not r.input_only and not _is_fresh(r) for r in self.waiting
        )

    def recompute_all(self) -> int:
        """New weights: every request's KV is stale. Preempt every running request (it is
        recomputed from its tokens by the next steps, as after any preemption), drop the KV
        of suspended (forked) ones (recomputed once joined) and forget every cached prefix
        and session pin. Returns how many requests were preempted."""
        victims = list(reversed(self.running))
        self.running = []
        for req in victims:  # appendleft in reverse: the oldest ends first in line again
            self._preempt(req)
        for req in self.suspended.values():
            self.kv.free(req)
            req.num_computed_tokens = 0
        self.kv.drop_reusable_kv()
        return len(victims)

    # -------------------------------------------------------------- fork / join

    def fork(self, parent_id: str, children: list[Request]) -> list[tuple[int, int]]:
        """Suspend ``parent_id`` and start ``children`` (branches whose prompts extend its
        tokens) on all the KV it has computed: full blocks shared, the partial last block
        copied. Returns the (source, destination) block copies the runner must make before
        the next step. ValueError (nothing changed) for a parent that cannot fork."""
        parent = self.requests.get(parent_id)
        if parent is None or parent.is_finished:
            raise ValueError(f"request {parent_id!r} is not running: only a running request can fork")
        if parent.input_only or parent.status == RequestStatus.SUSPENDED:
            raise ValueError(f"request {parent_id!r} cannot fork (an input stream, or forked already)")
        if parent.rolling:
            raise ValueError(f"request {parent_id!r} has kv_policy 'sinks': fork/join needs kv_policy 'full'")
        if parent.num_evicted_blocks:
            raise ValueError(f"request {parent_id!r} has released KV blocks that left its sliding window: "
                             "fork/join needs all of its KV (fork it before it outgrows the model's window)")
        for child in children:
            if child.request_id in self.requests:
                raise ValueError(f"request id {child.request_id!r} is already in use")
            if child.all_token_ids[: parent.num_tokens] != parent.all_token_ids:
                raise ValueError("a branch's prompt must start with the parent's tokens")
        if parent.block_ids and parent.num_computed_tokens % self.block_size:
            needed = len(children)
            if needed > self.kv.num_free_blocks + self.kv.sessions.reclaimable_blocks():
                raise ValueError(f"no room in the KV cache for {needed} forked partial blocks")
        if parent in self.running:
            self.running.remove(parent)
        elif parent in self.waiting:
            self.waiting.remove(parent)
        parent.status = RequestStatus.SUSPENDED
        self.suspended[parent_id] = parent
        copies = []
        for child in reversed(children):  # appendleft: the first branch first in line
            if parent.num_computed_tokens:
                copy = self.kv.fork_all(child, parent)
                if copy is not None:
                    copies.append(copy)
            self.requests[child.request_id] = child
            self.waiting.appendleft(child)
        return copies

    def join(self, parent_id: str, token_ids: list[int]) -> Request:
        """Resume a suspended request with ``token_ids`` appended to its context (its KV of
        everything before them is kept: only they are computed)."""
        parent = self.suspended.pop(parent_id, None)
        if parent is None:
            raise ValueError(f"request {parent_id!r} has not forked: nothing to join")
        parent.append_context(token_ids)
        parent.status = RequestStatus.WAITING
        self.waiting.appendleft(parent)
        return parent

    # ----------------------------------------------------------------- sessions

    def close_session(self, session_id: str) -> bool:
        """Unpin a session's KV now; a turn still in flight will not pin it either.

        Returns False when the session had neither a pin nor a request in flight.
        """
        found = self.kv.sessions.close(session_id)
        for req in self.requests.values():
            if req.session_id == session_id:
                req.session_id = None
                found = True
        return found

    def seconds_to_next_pin_expiry(self) -> float | None:
        """How long until a session pin expires (None without pins); idle loops wake then."""
        expiry = self.kv.sessions.next_expiry()
        return None if expiry is None else max(0.0, expiry - self.clock())

    def expire_sessions(self) -> int:
        """Drop the session pins whose TTL is over (also done at every schedule)."""
        return self.kv.sessions.expire(self.clock())


class _PrefillLimit:
    """How much prefill one step may still take under its TPOT target.

    Inactive (everything allowed) without a target or before the cost model has seen
    enough steps. Otherwise each prefill chunk gets what the model predicts fits in the
    target on top of the step so far, except that the step's first ``min_prefill_tokens``
    of prefill always run: when the decodes alone fill the target, prefill still moves
    (TTFT degrades, and the step counts as a floor step, rather than prefill stopping).
    """

    def __init__(self, scheduler: Scheduler, target: float | None) -> None:
        self.scheduler = scheduler
        self.target = target
        self.active = target is not None and scheduler.step_cost.ready
        self.shape = StepShape()
        self.prefill_tokens = 0
        self.capped = False
        self.floored = False
        self.exhausted = False

    def allow(self, start: int, n: int) -> int:
        """Tokens of a prefill chunk of up to ``n`` starting at ``start`` that may run."""
        if not self.active or self.exhausted:
            return 0 if self.exhausted else n
        assert self.target is not None
        fit = self.scheduler.step_cost.max_chunk_tokens(self.shape, start, self.target)
        floor_left = max(0, self.scheduler.config.min_prefill_tokens - self.prefill_tokens)
        allowed = max(fit, floor_left)
        if allowed < n:
            self.capped = True
            self.floored = self.floored or floor_left > fit
        if allowed <= 0:
            self.exhausted = True
            return 0
        return min(n, allowed)

    def add(self, start: int, n: int) -> None:
        """A chunk of ``n`` tokens from ``start`` is in the step."""
        if not self.active:
            return  # nothing to size: the hot path stays free of the bookkeeping
        self.shape = self.shape.with_chunk(start, n)
        if n > 1:
            self.prefill_tokens += n

    def finish(self) -> None:
        """The step is planned: count it."""
        self.scheduler.num_capped_steps += self.capped
        self.scheduler.num_floor_steps += self.floored

    def predicted(self) -> float:
        """The cost model's seconds for the step as planned (0 without a target)."""
        return self.scheduler.step_cost.predict(self.shape) if self.active else 0.0


def _chunk_len(req: Request, budget: int) -> int:
    """Tokens ``req`` computes this step: what it lacks, within the budget (a sinks or
    sliding-window request at most a window at once, so its blocks stay bounded by about
    two windows)."""
    n = min(req.num_tokens - req.num_computed_tokens, budget)
    if req.sliding_window is not None:
        return min(n, req.sliding_window)
    if not req.rolling:
        return n
    sinks = req.kv_policy.num_sink_tokens
    if req.kv_floor > sinks > req.num_computed_tokens:
        n = min(n, sinks - req.num_computed_tokens)  # recomputing: the sinks, then the floor
    return min(n, req.kv_policy.window)


def _peak_tokens(req: Request, num_tokens: int, block_size: int) -> int:
    """Token slots ``req`` needs at once to compute ``num_tokens`` more: all of them, but
    for a sinks or sliding-window request no more than its window, a chunk and the slack
    blocks it keeps."""
    if req.sliding_window is not None:
        return min(num_tokens, sliding_peak_tokens(req.sliding_window, block_size))
    if not req.rolling:
        return num_tokens
    policy = req.kv_policy
    bound = policy.num_sink_blocks(block_size) * block_size + 2 * policy.window + 3 * block_size
    if req.input_only:
        bound += policy.window
    return min(num_tokens, bound)


def sliding_peak_tokens(window: int, block_size: int) -> int:
    """Token slots a request of an all-sliding model holds at most at once: its window and
    the slack block it keeps, a chunk of at most a window, the block it writes into."""
    return 2 * window + 3 * block_size


def _is_fresh(req: Request) -> bool:
    """A request that has neither KV nor output: it can wait for new weights."""
    return req.num_preemptions == 0 and not req.output_token_ids and not req.block_ids and not req.input_only


# An aborted turn leaves nothing worth keeping: the client never saw its output.
_PINNED_FINISHES = (FinishReason.STOP, FinishReason.LENGTH)
# Statuses of a request admitted to the running set (its KV is there to share).
_HOLDS_KV = (RequestStatus.RUNNING, RequestStatus.WAITING_FOR_INPUT)
