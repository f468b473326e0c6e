"""The scheduler's side of a batched drafter (speculative_method="draft"), with a fake one:
one call per step for all draft requests, the step's budget handed out in order, the
drafter told what the target kept (rollback) and when a request's state can go (finish,
abort, preemption). Pure Python."""

from __future__ import annotations

from livelm.config import CacheConfig, SchedulerConfig
from livelm.core.request import Request
from livelm.core.scheduler import Scheduler
from livelm.core.scheduler_output import ModelRunnerOutput, SampledToken
from livelm.core.speculative.batched import DraftItem
from livelm.core.speculative.config import SpeculativeConfig
from livelm.sampling_params import SamplingParams


class FakeDrafter:
    """Drafts ``100, 101, ...`` up to each limit and records every call."""

    def __init__(self) -> None:
        self.calls: list[list[DraftItem]] = []
        self.rollbacks: list[tuple[str, int]] = []
        self.finished: list[str] = []
        self.forward_seconds = 0.5

    def propose_batch(self, items: list[DraftItem]) -> dict[str, list[int]]:
        self.calls.append(list(items))
        return {it.request_id: list(range(100, 100 + it.limit)) for it in items}

    def rollback(self, request_id: str, num_tokens: int) -> None:
        self.rollbacks.append((request_id, num_tokens))

    def finish(self, request_id: str) -> None:
        self.finished.append(request_id)


def _scheduler(drafter: FakeDrafter, budget: int = 64, blocks: int = 64, k: int = 3, method: str | None = "draft",
               adaptive: bool = False):
    spec = SpeculativeConfig(method=method, num_speculative_tokens=k, adaptive=adaptive,
                             draft_model=None if method != "draft" else "fake")
    return Scheduler(SchedulerConfig(budget, 8, 512), CacheConfig(4, blocks), speculative=spec, drafter=drafter)


def _req(rid: str, n: int, first: int = 1, **kw) -> Request:
    # Prompts that start differently: a shared prefix would make one wait for the other's KV.
    return Request(rid, list(range(first, first + n)), SamplingParams(temperature=0, max_tokens=50, ignore_eos=True), **kw)


def _prefill(s: Scheduler) -> None:
    out = s.schedule()
    assert all(not c.draft_token_ids for c in out.chunks)
    s.update(out, ModelRunnerOutput({c.request_id: SampledToken(7) for c in out.chunks if c.sample}))


def test_one_call_drafts_every_draft_request_of_the_step():
    d = FakeDrafter()
    s = _scheduler(d)
    for i in range(3):
        s.add_request(_req(f"r{i}", 5 + i, first=10 * i + 1))
    s.add_request(_req("plain", 4, first=50, speculative_method="off"))
    _prefill(s)
    assert d.calls == []  # nothing decodes yet
    out = s.schedule()
    assert len(d.calls) == 1
    assert [(it.request_id, it.token_ids, it.limit) for it in d.calls[0]] == [
        (f"r{i}", [*range(10 * i + 1, 10 * i + 6 + i), 7], 3) for i in range(3)]
    drafts = {c.request_id: c.draft_token_ids for c in out.chunks}
    assert drafts == {"r0": (100, 101, 102), "r1": (100, 101, 102), "r2": (100, 101, 102), "plain": ()}
    # The target accepts one draft of r0 and none of r1, all of r2; each gets one token more.
    spec = {"r0": [SampledToken(100), SampledToken(9)], "r1": [SampledToken(8)],
            "r2": [SampledToken(100), SampledToken(101), SampledToken(102), SampledToken(9)]}
    s.update(out, ModelRunnerOutput({"plain": SampledToken(7)}, spec_sampled=spec))
    # The drafter keeps what the target kept: the context, the accepted drafts.
    assert sorted(d.rollbacks) == [("r0", 6 + 1), ("r1", 7 + 0), ("r2", 8 + 3)]
    assert s.requests["r0"].all_token_ids[-3:] == [7, 100, 9]
    assert s.speculator.stats().draft_model_seconds == 0.5


def test_the_budget_is_handed_to_the_drafts_in_order():
    d = FakeDrafter()
    s = _scheduler(d, budget=8, k=5)
    for i in range(3):
        s.add_request(_req(f"r{i}", 2, first=10 * i + 1))  # one prefill step for all three
    _prefill(s)
    out = s.schedule()
    # 8 tokens: one per decode, the 5 left all to the first request's draft.
    assert [(it.request_id, it.limit) for it in d.calls[0]] == [("r0", 5)]
    assert {c.request_id: len(c.draft_token_ids) for c in out.chunks} == {"r0": 5, "r1": 0, "r2": 0}
    assert out.num_batched_tokens == 8


def test_a_draft_not_scheduled_is_rolled_back_to_the_known_tokens():
    d = FakeDrafter()
    s = _scheduler(d, blocks=3)  # 12 slots: the first request's draft takes every free one
    s.add_request(_req("a", 4))
    s.add_request(_req("b", 3, first=20))
    _prefill(s)
    out = s.schedule()
    assert {it.request_id for it in d.calls[0]} == {"a", "b"}
    drafted = [c.request_id for c in out.chunks if c.draft_token_ids]
    assert len(drafted) < 2  # no free block was left for one of them
    undrafted = next(rid for rid in ("a", "b") if rid not in drafted)
    assert (undrafted, s.requests[undrafted].num_tokens) in d.rollbacks


def test_finish_abort_and_preemption_free_the_drafters_state():
    d = FakeDrafter()
    s = _scheduler(d)
    s.add_request(_req("a", 4))
    s.add_request(_req("b", 4, first=20))
    _prefill(s)
    s.finish_request("a")
    assert "a" in d.finished
    s.running.remove(s.requests["b"])  # as the scheduler preempts when the pool runs dry
    s._preempt(s.requests["b"])
    assert "b" in d.finished
    s.finish_request("b")


def test_a_request_of_another_method_never_reaches_the_batched_drafter():
    d = FakeDrafter()
    s = _scheduler(d, method="ngram")
    s.add_request(_req("a", 6))
    s.add_request(_req("b", 6, first=20, speculative_method="draft"))
    _prefill(s)
    s.schedule()
    assert [[it.request_id for it in call] for call in d.calls] == [["b"]]


def test_speculation_is_gated_by_the_step_cost_model():
    """With a ready cost model, a step speculates only when verifying drafts is predicted
    to yield tokens faster than plain decoding: on a host where rows are cheap (weight
    reads dominate) it drafts; where every extra row costs as much as a whole step's fixed
    part (compute-bound) it decodes plainly. Before the model is ready it drafts."""
    from livelm.core.step_cost import StepCostModel

    def run(coefficients: tuple[float, ...] | None) -> bool:
        d = FakeDrafter()
        s = _scheduler(d, adaptive=True)
        if coefficients is not None:
            s.step_cost = StepCostModel.from_coefficients(coefficients, frozen=True)
        for i in range(2):
            s.add_request(_req(f"r{i}", 5, first=10 * i + 1))
        _prefill(s)
        out = s.schedule()
        return any(c.draft_token_ids for c in out.chunks)

    assert run(None)  # not ready: the configured rule decides
    # 20 ms a step, 0.1 ms a token: a draft of 3 costs little and (at 0.5 acceptance) pays.
    assert run((0.020, 0.0, 0.0001, 0.0, 0.0, 0.0))
    # 1 ms a step, 10 ms a token: every verified row costs a plain token's time: no drafts.
    assert not run((0.001, 0.0, 0.010, 0.0, 0.0, 0.0))
