"""The simulator (livelm/sim/): the real scheduler on a simulated clock. Its schedule is
the engine's, step for step; its routers, metrics and bad input."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from livelm.config import CacheConfig, SchedulerConfig
from livelm.core.step_cost import StepCostModel, StepShape
from livelm.engine.llm import LLM
from livelm.sampling_params import SamplingParams
from livelm.sim.calibrate import load_serving_overhead, save_cost_model, serving_overhead_from
from livelm.sim.cluster import simulate
from livelm.sim.workload import SimRequest, burstgpt_requests, synthetic_requests

ONE_SECOND_PER_STEP = StepCostModel.from_coefficients((1.0, 0.0, 0.0, 0.0, 0.0, 0.0))
HOST = StepCostModel.from_coefficients((0.004, 0.0008, 0.0045, 0.0012, 0.0012, 0.0))
TRACE = "benchmarks/traces/burstgpt_synthetic.csv"


@pytest.mark.parametrize("budget", [64, 17])
def test_the_simulated_schedule_is_the_engines_step_for_step(llama_dir, budget):
    """The engine and the simulator (each step 1 s) serve the same batch: every request's
    first and last token come at the same step."""
    rng = random.Random(0)
    lengths = [(rng.randrange(1, 120), rng.randrange(1, 20)) for _ in range(12)]
    llm = LLM(str(llama_dir), max_num_batched_tokens=budget, max_num_seqs=5, max_model_len=256)
    engine = llm.engine
    first, last = {}, {}
    for i, (n_in, n_out) in enumerate(lengths):
        prompt = [rng.randrange(3, 400) for _ in range(n_in)]
        engine.add(f"q{i}", prompt, SamplingParams(temperature=0, max_tokens=n_out, ignore_eos=True))
    step = 0
    while engine.scheduler.has_unfinished():
        step += 1
        for state, out in engine.step():
            i = int(state.request_id[1:])
            first.setdefault(i, step)
            if out.finished:
                last[i] = step
    sim = simulate([SimRequest(0.0, n_in, n_out) for n_in, n_out in lengths], ONE_SECOND_PER_STEP,
                   scheduler_config=SchedulerConfig(budget, 5, 256),
                   cache_config=CacheConfig(engine.cache_config.block_size, engine.cache_config.num_blocks))
    assert [round(r.ttft_s) for r in sim.records] == [first[i] for i in range(len(lengths))]
    assert [round(r.e2e_s) for r in sim.records] == [last[i] for i in range(len(lengths))]
    assert all(r.output_tokens == n_out for r, (_, n_out) in zip(sim.records, lengths, strict=True))


def test_replicas_and_routers_share_the_load():
    reqs = burstgpt_requests(TRACE, time_scale=0.05)  # 20x the trace's rate: one replica saturates
    one = simulate(reqs, HOST, 1).metrics({"ttft": 1000})
    eight = simulate(reqs, HOST, 8).metrics({"ttft": 1000})
    robin = simulate(reqs, HOST, 8, router="round_robin").metrics({"ttft": 1000})
    assert one["completed"] == eight["completed"] == robin["completed"] == len(reqs)
    assert eight["ttft_ms"]["p50"] < one["ttft_ms"]["p50"] / 2
    assert eight["good_fraction"] > one["good_fraction"]
    assert eight["total_output_tokens"] == one["total_output_tokens"] == sum(r.output_tokens for r in reqs)


def test_the_fair_policy_protects_a_light_tenant_in_simulation():
    flood = [SimRequest(0.01 * i, 200, 20, tenant="heavy") for i in range(300)]
    light = [SimRequest(0.5 + 0.5 * i, 50, 10, tenant="light") for i in range(10)]
    p99 = {}
    for policy in ("fcfs", "fair"):
        res = simulate(flood + light, HOST, 1, scheduler_config=SchedulerConfig(512, 16, 2048, policy=policy))
        p99[policy] = res.metrics()["tenants"]["light"]["ttft_p99_ms"]
    assert p99["fair"] * 5 < p99["fcfs"], p99


def test_synthetic_arrivals_and_metrics():
    reqs = synthetic_requests(50, rate=4.0, input_tokens=64, output_tokens=16, seed=1)
    res = simulate(reqs, HOST, 2)
    m = res.metrics({"ttft": 500, "tpot": 100})
    assert m["completed"] == 50 and m["total_output_tokens"] == 800
    assert 0 <= m["good_fraction"] <= 1 and m["steps"] > 0 and res.speedup > 1
    assert not math.isnan(m["tpot_ms"]["p50"])


def test_the_serving_overhead_delays_every_step(tmp_path):
    """A request alone: each decode step takes the predicted step plus the overhead, so its
    TPOT rises by exactly that; the scheduler still learns the engine's step alone. The
    overhead is what a served batch-of-one step takes beyond the prediction, read back
    from the cost model file."""
    req = [SimRequest(0.0, 32, 17)]
    plain = simulate(req, HOST, 1, learn_online=True).metrics()
    served = simulate(req, HOST, 1, learn_online=True, step_overhead_s=0.004).metrics()
    assert served["tpot_ms"]["p50"] == pytest.approx(plain["tpot_ms"]["p50"] + 4.0)
    assert served["ttft_ms"]["p50"] == pytest.approx(plain["ttft_ms"]["p50"] + 4.0)  # one prefill step
    predicted = statistics.median(HOST.predict(StepShape.of_chunks([(p, 1)])) for p in range(32, 96))
    assert serving_overhead_from(predicted * 1000 + 3.0, HOST) == pytest.approx(0.003)
    assert serving_overhead_from(predicted * 1000 / 2, HOST) == 0.0  # never negative
    path = tmp_path / "cost.json"
    save_cost_model(HOST, path, serving_overhead_s=0.0031)
    assert load_serving_overhead(path) == 0.0031
    save_cost_model(HOST, path)
    assert load_serving_overhead(path) == 0.0
    save_cost_model(HOST, path, serving_overhead_s=-1)
    with pytest.raises(ValueError, match="serving_overhead_s"):
        load_serving_overhead(path)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: simulate([SimRequest(0, 10, 10)], HOST, 1, step_overhead_s=math.nan), "step_overhead_s"),
        (lambda: simulate([SimRequest(0, 10, 10)], HOST, 1, step_overhead_s=-0.001), "step_overhead_s"),
        (lambda: serving_overhead_from(math.inf, HOST), "measured TPOT"),
        (lambda: simulate([SimRequest(0, 10, 10)], HOST, 0), "num_replicas"),
        (lambda: simulate([SimRequest(0, 10, 10)], HOST, 1, router="psychic"), "unknown router"),
        (lambda: simulate([SimRequest(0, 5000, 10)], HOST, 1), "does not fit"),
        (lambda: SimRequest(math.nan, 10, 10), "arrival_s"),
        (lambda: SimRequest(0, 0, 10), "at least one"),
        (lambda: burstgpt_requests(TRACE, time_scale=0), "time_scale"),
    ],
)
def test_bad_input_is_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()
