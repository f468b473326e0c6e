"""Scheduling policies, the step cost model and the TPOT budget on hand-built scenarios:
pure Python, a fake runner, a fake clock (no torch)."""

from __future__ import annotations

import math
import random

import pytest

from livelm.config import CacheConfig, EngineConfig, SchedulerConfig
from livelm.core.request import Request, RequestStatus
from livelm.core.request_options import RequestOptions
from livelm.core.scheduler import Scheduler
from livelm.core.scheduler_output import ModelRunnerOutput, SampledToken
from livelm.core.scheduling_policy import FairPolicy, make_policy
from livelm.core.step_cost import StepCostModel, StepShape
from livelm.sampling_params import SamplingParams


class FakeClock:
    """A clock the tests move by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _scheduler(policy="fcfs", budget=64, seqs=8, blocks=64, block=4, clock=None, **kw) -> Scheduler:
    return Scheduler(SchedulerConfig(budget, seqs, 512, policy=policy, **kw), CacheConfig(block, blocks),
                     clock=clock or FakeClock())


_FIRST_TOKEN = iter(range(1, 10**9, 10_000))


def _req(rid, n, max_tokens=4, **kw) -> Request:
    """A request of ``n`` prompt tokens shared with no other request (no prefix hits)."""
    first = next(_FIRST_TOKEN)
    return Request(rid, list(range(first, first + n)), SamplingParams(temperature=0, max_tokens=max_tokens),
                   arrival_time=kw.pop("arrival_time", 0.0), **kw)


def _run_step(s: Scheduler, seconds: float | None = None):
    out = s.schedule()
    s.update(out, ModelRunnerOutput({c.request_id: SampledToken(7) for c in out.chunks if c.sample}))
    if seconds is not None:
        s.clock.now += seconds
        s.observe_step(out, seconds)
    return out


def _admitted(out) -> list[str]:
    return [c.request_id for c in out.chunks]


# ------------------------------------------------------------------ ordering


def test_fcfs_admits_in_arrival_order():
    s = _scheduler(seqs=2)
    for rid in ("a", "b", "c"):
        s.add_request(_req(rid, 4, priority=5 if rid == "c" else 0))
    assert _admitted(s.schedule()) == ["a", "b"]


def test_priority_admits_the_highest_first_and_keeps_arrival_order_within_a_level():
    s = _scheduler("priority", seqs=3)
    for rid, prio in (("low", -1), ("mid1", 0), ("high", 3), ("mid2", 0)):
        s.add_request(_req(rid, 4, priority=prio))
    assert _admitted(s.schedule()) == ["high", "mid1", "mid2"]
    assert [r.request_id for r in s.waiting] == ["low"]


def test_priority_preempts_lower_priority_for_memory_never_equal():
    # 8 blocks of 4 slots: "low" holds 4 blocks; a 17-token prompt needs 5 and does not fit.
    s = _scheduler("priority", blocks=8)
    low = _req("low", 15, max_tokens=5, priority=0)
    s.add_request(low)
    _run_step(s)
    s.add_request(_req("peer", 17, max_tokens=2, priority=0))
    out = _run_step(s)
    assert "peer" not in _admitted(out) and low.status == RequestStatus.RUNNING  # equal priority waits
    s.add_request(_req("high", 17, max_tokens=2, priority=5))
    out = _run_step(s)
    assert "high" in _admitted(out)
    assert low.status == RequestStatus.PREEMPTED and low.num_preemptions == 1
    while s.has_unfinished():
        _run_step(s)
    assert low.num_output_tokens == 5 and s.kv.num_free_blocks == 8


def test_priority_victim_under_memory_pressure_is_the_lowest():
    s = _scheduler("priority", budget=64, blocks=8, block=4)
    reqs = [_req("vip", 8, max_tokens=12, priority=2), _req("bulk", 8, max_tokens=12, priority=-2),
            _req("std", 8, max_tokens=12, priority=0)]
    for r in reqs:
        s.add_request(r)
    while s.has_unfinished():
        _run_step(s)
    preempted = {r.request_id: r.num_preemptions for r in reqs}
    assert preempted["bulk"] >= 1 and preempted["vip"] == 0
    assert all(r.num_output_tokens == 12 for r in reqs) and s.kv.num_free_blocks == 8


def test_deadline_admits_the_earliest_deadline_first():
    s = _scheduler("deadline", seqs=2)
    s.add_request(_req("none", 4))
    s.add_request(_req("late", 4, ttft_slo=5.0))
    s.add_request(_req("soon", 4, ttft_slo=0.5, arrival_time=1.0))
    assert _admitted(s.schedule()) == ["soon", "late"]


def test_deadline_policy_uses_the_engine_default_target():
    s = _scheduler("deadline", seqs=1, ttft_slo_ms=1000)
    s.add_request(_req("a", 4, arrival_time=3.0))
    s.add_request(_req("b", 4, arrival_time=1.0))
    assert s.requests["a"].ttft_deadline == 4.0
    assert _admitted(s.schedule()) == ["b"]


def test_ttft_misses_are_counted_on_the_scheduler_clock():
    clock = FakeClock()
    s = _scheduler(clock=clock, ttft_slo_ms=100)
    s.add_request(_req("ok", 4))
    _run_step(s)  # first token at t=0
    s.add_request(_req("slow", 4))
    clock.now = 0.5
    _run_step(s)
    assert s.stats().slo.num_ttft_misses == 1
    assert s.requests["slow"].first_token_time == 0.5


def test_fair_policy_serves_the_light_tenant_ahead_of_a_flood():
    s = _scheduler("fair", budget=16, seqs=2)
    for i in range(6):
        s.add_request(_req(f"flood{i}", 12, max_tokens=3, tenant="heavy"))
    _run_step(s)
    _run_step(s)  # heavy has been charged for its prefill
    s.add_request(_req("light", 12, max_tokens=3, tenant="light"))
    order = []
    while s.has_unfinished():
        out = _run_step(s)
        order += [c.request_id for c in out.chunks if c.start_position == 0]
    assert order.index("light") < order.index("flood3"), order


def test_fair_shares_converge_between_a_heavy_and_a_light_tenant():
    # Both tenants keep a backlog; the heavy one sends 4x as many requests. Token-fair
    # service gives each about half of the tokens served, whatever the request counts.
    s = _scheduler("fair", budget=48, seqs=4, blocks=256)
    served = {"heavy": 0, "light": 0}
    assert isinstance(s.policy, FairPolicy)
    n = 0
    for step in range(400):
        backlog = {t: sum(r.tenant == t for r in s.requests.values()) for t in served}
        for tenant, want in (("heavy", 8), ("light", 2)):
            while backlog[tenant] < want:
                s.add_request(_req(f"{tenant}{n}", 16, max_tokens=8, tenant=tenant))
                n += 1
                backlog[tenant] += 1
        out = _run_step(s)
        if step >= 100:
            for c in out.chunks:
                tenant = "heavy" if c.request_id.startswith("heavy") else "light"
                served[tenant] += (0 if c.is_decode else c.num_tokens) + (2 if c.sample else 0)
    share = served["light"] / (served["light"] + served["heavy"])
    assert 0.4 < share < 0.6, served


def test_fair_counters_restart_at_the_floor_after_idling():
    policy = FairPolicy()
    a, b = _req("a", 4, tenant="a"), _req("b", 4, tenant="b")
    policy.added(a)
    policy.account(a, 1000, 0)
    policy.added(b)
    assert policy.counters["b"] == 1000.0  # lifted to the active floor: no credit for idling
    policy.finished(a)
    assert "a" not in policy.counters


def test_policies_keep_streams_and_sessions_working():
    for name in ("fcfs", "priority", "fair", "deadline"):
        s = _scheduler(name, budget=16)
        stream = Request.input_stream("s", [1, 2, 3])
        s.add_request(stream)
        s.add_request(_req("a", 20, max_tokens=3, session_id="sess", tenant="t", ttft_slo=1.0))
        for _ in range(6):
            _run_step(s)
        s.update_input("s", 3, [4, 5, 6, 7], close=False)
        while s.has_pending_work():
            _run_step(s)
        assert stream.num_computed_tokens == 7
        assert s.kv.sessions.reclaimable_blocks() > 0, name  # the session's pin survived
        s.finish_request("s")
        s.close_session("sess")
        assert s.kv.num_free_blocks == 64, name


# ----------------------------------------------------------------- cost model


# A host linear in every feature: 4 ms a step, 0.8 ms a sequence, 4.5 ms a token, 1.2 ms
# per 1024 query-key pairs of decode or prefill attention.
LINEAR_HOST = (0.004, 0.0008, 0.0045, 0.0012, 0.0012, 0.0)
# The same with the matmuls switching kernel above 12 rows (a hand-built host): 80 ms more at once, then 1.5 ms
# a token less (an AVX2 host's fused quantized kernel against dequantized tiles).
SWITCHING_HOST = (*LINEAR_HOST, 0.08, -0.0015)


def _true_cost(shape: StepShape) -> float:
    return sum(c * x for c, x in zip(LINEAR_HOST, shape.base_features(), strict=True))


def _random_shape(rng: random.Random) -> StepShape:
    """0-23 decodes and, 60% of the time, a prefill chunk."""
    shape = StepShape.of_chunks([(rng.randrange(10, 500), 1) for _ in range(rng.randrange(0, 24))])
    if rng.random() < 0.6:
        shape = shape.with_chunk(rng.randrange(0, 400), rng.randrange(8, 400))
    return shape


def test_cost_model_learns_a_linear_host_from_mixed_steps():
    rng = random.Random(0)
    model = StepCostModel(prior=(1e-4,) * 6)  # far from the truth
    for _ in range(60):
        shape = _random_shape(rng)
        if shape.tokens:
            model.observe(shape, _true_cost(shape) * rng.uniform(0.97, 1.03))
    for probe in (StepShape.of_chunks([(200, 1)] * 16), StepShape.of_chunks([(0, 256)]),
                  StepShape.of_chunks([(300, 1)] * 8 + [(100, 64)])):
        assert abs(model.predict(probe) / _true_cost(probe) - 1) < 0.1


def test_cost_model_ignores_nonsense_measurements_and_validates_its_prior():
    model = StepCostModel()
    for bad in (math.nan, math.inf, -1.0, 0.0):
        model.observe(StepShape(1, 1, 0.1), bad)
    assert model.num_observations == 0
    with pytest.raises(ValueError, match="prior"):
        StepCostModel(prior=(1.0, math.nan, 0.0, 0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="prior"):
        StepCostModel(prior=(1.0, -1.0, 0.0, 0.0, 0.0, 0.0))


def test_cost_model_learns_a_kernel_switch_at_its_breakpoint():
    # A straight line through both sides of the switch misses small steps badly; with the
    # runner's breakpoint the fit is piecewise and right on both sides.
    rng = random.Random(1)
    true = StepCostModel.from_coefficients(SWITCHING_HOST, breakpoints=(12,))
    aware, blind = StepCostModel(breakpoints=(12,)), StepCostModel()
    for i in range(300):  # as calibration runs: decode-only batches of 1-24, small steps, mixed ones
        if i % 3 == 0:
            shape = StepShape.of_chunks([(200, 1)] * rng.randrange(1, 25))
        elif i % 3 == 1:
            shape = StepShape.of_chunks([(200, 1)] * rng.randrange(0, 5)).with_chunk(rng.randrange(0, 99),
                                                                                  rng.randrange(2, 9))
        else:
            shape = _random_shape(rng)
        if shape.tokens:
            seconds = true.predict(shape) * rng.uniform(0.97, 1.03)
            aware.observe(shape, seconds)
            blind.observe(shape, seconds)
    probes = [StepShape.of_chunks([(200, 1)] * b) for b in (1, 8, 12, 13, 24)]
    probes += [StepShape.of_chunks([(0, n)]) for n in (4, 12, 13, 64, 256)]
    probes.append(StepShape.of_chunks([(300, 1)] * 8 + [(100, 64)]))
    for probe in probes:
        assert abs(aware.predict(probe) / true.predict(probe) - 1) < 0.1, probe
    assert max(abs(blind.predict(p) / true.predict(p) - 1) for p in probes) > 0.3
    c = aware.coefficients
    assert len(c) == 8 and c[2] + c[7] >= 0 and aware.to_dict()["breakpoints"] == [12]


def test_fitted_slopes_stay_physical_past_a_breakpoint():
    # Steps past the breakpoint that cost less the more tokens they have (noise, or a host
    # that changed): the fit never gives a token a negative cost.
    model = StepCostModel(breakpoints=(12,), prior_weight=1e-6)
    for n in range(13, 200, 3):
        model.observe(StepShape.of_chunks([(0, n)]), 1.0 - n * 0.004)
    for n in range(1, 13):
        model.observe(StepShape.of_chunks([(0, n)]), 0.01 * n)
    c = model.coefficients
    assert c[7] < 0 and c[2] + c[7] >= -1e-12
    assert model.predict(StepShape.of_chunks([(0, 10_000)])) >= 0


@pytest.mark.parametrize("coefficients, breakpoints", [(LINEAR_HOST, ()), (SWITCHING_HOST, (12,)),
                                                       ((*LINEAR_HOST, 0.08, -0.0015, -0.01, 0.0005), (19, 127))])
def test_max_chunk_tokens_is_the_largest_chunk_that_fits_across_breakpoints(coefficients, breakpoints):
    model = StepCostModel.from_coefficients(coefficients, breakpoints=breakpoints)
    for decodes in (0, 3, 8, 16):
        base = StepShape.of_chunks([(300, 1)] * decodes)
        for start in (0, 100, 2048):
            for target in (0.01, 0.05, 0.1, 0.15, 0.3, 1.0, 3.0):
                fits = [n for n in range(1, 1500) if model.predict(base.with_chunk(start, n)) <= target]
                assert model.max_chunk_tokens(base, start, target) == max(fits, default=0), (decodes, start, target)


def test_malformed_breakpoints_and_priors_are_refused():
    with pytest.raises(ValueError, match="breakpoints"):
        StepCostModel(breakpoints=(0,))
    with pytest.raises(ValueError, match="prior"):
        StepCostModel(prior=(1.0, 0.0, 0.0, 0.0))  # 4 coefficients: an older model's
    with pytest.raises(ValueError, match="prior"):
        StepCostModel(prior=LINEAR_HOST + (0.1,), breakpoints=(12,))


def test_max_chunk_tokens_is_the_largest_chunk_that_fits():
    model = StepCostModel.from_coefficients(LINEAR_HOST)
    base = StepShape.of_chunks([(300, 1)] * 8)
    n = model.max_chunk_tokens(base, 100, 0.1)
    assert model.predict(base.with_chunk(100, n)) <= 0.1 < model.predict(base.with_chunk(100, n + 1))
    assert model.max_chunk_tokens(base, 100, 0.01) == 0


# ------------------------------------------------------------------ TPOT budget


def test_tpot_budget_keeps_simulated_decode_steps_under_target_while_a_stream_prefills():
    # The "host" is a known cost model; steps take what it says, and the scheduler learns
    # it from the steps it measures. 8 decoding requests and a stream arriving 33 tokens
    # per step up to 4000: without a target the stream's chunks fill the budget and decode
    # steps take over 0.2 s; with a 100 ms target every decode step stays under it.
    true = StepCostModel.from_coefficients(LINEAR_HOST)

    def run(tpot_ms):
        clock = FakeClock()
        kw = {} if tpot_ms is None else {"tpot_slo_ms": tpot_ms}
        s = _scheduler(budget=256, seqs=16, blocks=2048, block=16, clock=clock, min_prefill_tokens=4, **kw)
        for i in range(8):
            s.add_request(_req(f"d{i}", 32, max_tokens=400))
        stream = Request.input_stream("s", list(range(1, 101)))
        s.add_request(stream)
        decode_steps, misses_warming_up = [], 0
        for step in range(150):
            if step == 20:  # the cost model has learnt the host by now
                misses_warming_up = s.num_tpot_misses
            if step % 3 == 0 and stream.num_tokens < 4000:
                s.update_input("s", stream.num_tokens, list(range(1, 101)))
            out = s.schedule()
            seconds = true.predict(StepShape.of_chunks((c.start_position, c.num_tokens) for c in out.chunks))
            s.update(out, ModelRunnerOutput({c.request_id: SampledToken(7) for c in out.chunks if c.sample}))
            clock.now += seconds
            s.observe_step(out, seconds)
            if step >= 20 and any(c.is_decode for c in out.chunks):
                decode_steps.append(seconds)
        for rid in list(s.requests):
            s.finish_request(rid)
        return decode_steps, stream.num_computed_tokens, s.stats().slo, s.num_tpot_misses - misses_warming_up

    free, free_prefilled, _, _ = run(None)
    capped, capped_prefilled, slo, misses = run(100)
    assert max(free) > 0.2
    assert max(capped) <= 0.1 * 1.02, max(capped)
    assert 4 * 130 <= capped_prefilled < free_prefilled  # the stream still moves, more slowly
    assert slo.num_capped_steps > 0 and misses == 0


def test_tpot_budget_runs_the_minimum_prefill_when_decodes_alone_fill_the_target():
    clock = FakeClock()
    s = _scheduler(budget=256, seqs=32, blocks=2048, block=16, clock=clock, tpot_slo_ms=10,
                   min_prefill_tokens=24)
    s.step_cost = StepCostModel.from_coefficients(LINEAR_HOST)
    for i in range(16):
        s.add_request(_req(f"d{i}", 8, max_tokens=50))
    _run_step(s)  # prefill all (no decodes yet: no target)
    s.add_request(_req("long", 500, max_tokens=2))
    out = s.schedule()
    long_chunk = next(c for c in out.chunks if c.request_id == "long")
    assert long_chunk.num_tokens == 24
    s.update(out, ModelRunnerOutput({c.request_id: SampledToken(7) for c in out.chunks if c.sample}))
    assert s.stats().slo.num_floor_steps == 1
    for rid in list(s.requests):
        s.finish_request(rid)


def test_the_tightest_request_target_sizes_the_step():
    s = _scheduler(budget=512, blocks=1024, block=16, tpot_slo_ms=1000)
    s.step_cost = StepCostModel.from_coefficients(LINEAR_HOST)
    s.add_request(_req("tight", 8, max_tokens=50, tpot_slo=0.05))
    _run_step(s)
    s.add_request(_req("long", 500, max_tokens=2))
    out = s.schedule()
    chunk = next(c for c in out.chunks if c.request_id == "long")
    assert 1 <= chunk.num_tokens < 24  # sized for 50 ms (~8 tokens); 1 s would allow ~200
    s.update(out, ModelRunnerOutput({c.request_id: SampledToken(7) for c in out.chunks if c.sample}))
    for rid in list(s.requests):
        s.finish_request(rid)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"policy": "lottery"}, "unknown scheduling_policy"),
        ({"tpot_slo_ms": -5}, "tpot_slo_ms"),
        ({"tpot_slo_ms": math.nan}, "tpot_slo_ms"),
        ({"ttft_slo_ms": math.inf}, "ttft_slo_ms"),
        ({"ttft_slo_ms": 1e300}, "ttft_slo_ms"),
        ({"ttft_slo_ms": True}, "ttft_slo_ms"),
        ({"min_prefill_tokens": 0}, "min_prefill_tokens"),
        ({"max_priority": -1}, "max_priority"),
    ],
)
def test_bad_scheduler_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SchedulerConfig(64, 8, 512, **kwargs)
    engine_kwargs = {("scheduling_policy" if k == "policy" else k): v for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=match):
        EngineConfig(**engine_kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"priority": 1.5}, "priority"),
        ({"priority": True}, "priority"),
        ({"priority": 10**12}, "priority"),
        ({"priority": "high"}, "priority"),
        ({"tenant": ""}, "tenant"),
        ({"tenant": "x" * 1000}, "tenant"),
        ({"tenant": 7}, "tenant"),
        ({"ttft_slo_ms": 0}, "ttft_slo_ms"),
        ({"tpot_slo_ms": math.nan}, "tpot_slo_ms"),
        ({"tpot_slo_ms": "fast"}, "tpot_slo_ms"),
    ],
)
def test_bad_request_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RequestOptions(**kwargs)


def test_a_priority_outside_the_configured_range_is_refused_by_the_scheduler():
    s = _scheduler("priority", max_priority=3)
    with pytest.raises(ValueError, match="from -3 to 3"):
        s.add_request(_req("a", 4, priority=4))
    assert not s.requests and not s.waiting


def test_unknown_policy_names_the_choices():
    with pytest.raises(ValueError, match="fcfs, priority, fair, deadline"):
        make_policy("random")
