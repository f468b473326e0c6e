"""``livelm simulate``: calibrate the step cost model on this host, or replay a trace on
simulated replicas with it (docs/scheduling.md#the-simulator)."""

from __future__ import annotations

import argparse
import json
import math
import time

from livelm.core.scheduling_policy import SCHEDULING_POLICIES


def add_simulate_args(p: argparse.ArgumentParser) -> None:
    """The ``livelm simulate`` flags."""
    p.add_argument("--calibrate", metavar="OUT", default=None,
                   help="run the engine (--model) through a mixed workload and write the fitted "
                        "step cost model to OUT (JSON), then exit")
    p.add_argument("--serving", action="store_true",
                   help="with --calibrate: also measure what serving adds to each step (runs livelm bench "
                        "serve, single requests one at a time) and record it in OUT")
    p.add_argument("--step-overhead-ms", type=float, default=None,
                   help="ms added to every simulated step (default: the serving overhead --cost records, "
                        "else 0: an in-process engine)")
    p.add_argument("--model", default=None, help="the model to calibrate on (default: the embedded one)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads while calibrating")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget per step")
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--cost", default=None, help="a step cost model file (--calibrate writes one)")
    p.add_argument("--trace", default=None, help="a BurstGPT-format CSV to replay with its timestamps")
    p.add_argument("--time-scale", type=float, default=1.0, help="multiply the trace's arrival times")
    p.add_argument("--num-requests", type=int, default=None, help="requests of the trace (default: all)")
    p.add_argument("--rate", type=float, default=None, help="instead of a trace: Poisson/gamma arrivals per second")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps (1: Poisson)")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--replicas", default="1", help="comma-separated replica counts, e.g. 1,8,64")
    p.add_argument("--router", default="least_load", choices=["least_load", "round_robin", "random"])
    p.add_argument("--scheduling-policy", default="fcfs", choices=SCHEDULING_POLICIES)
    p.add_argument("--tpot-slo-ms", type=float, default=None, help="the engine's TPOT target")
    p.add_argument("--num-kv-blocks", type=int, default=4096, help="KV blocks per replica (16 tokens each)")
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--slo", action="append", default=[], metavar="METRIC=MS",
                   help="goodput SLO, e.g. --slo ttft=1000 --slo tpot=100 (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=simulate_main)


def simulate_main(args: argparse.Namespace) -> int:
    """Run ``livelm simulate`` with parsed arguments."""
    from livelm.bench.metrics import parse_slos
    from livelm.config import CacheConfig, SchedulerConfig
    from livelm.sim.calibrate import (
        calibrate,
        load_cost_model,
        load_serving_overhead,
        measure_serving_overhead,
        save_cost_model,
    )
    from livelm.sim.cluster import simulate
    from livelm.sim.workload import burstgpt_requests, synthetic_requests

    if args.calibrate:
        from livelm.engine.llm import LLM

        llm = LLM(args.model, num_threads=args.threads, max_num_batched_tokens=args.max_num_batched_tokens,
                  max_num_seqs=args.max_num_seqs)
        model, samples = calibrate(llm.engine)
        info = dict(model=llm.engine.model_name, steps=len(samples),
                    date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        del llm  # the serving probe starts its own server: one engine on these cores at a time
        if args.serving:
            info["serving_overhead_s"], info["serving_tpot_p50_ms"] = measure_serving_overhead(
                model, args.model, args.threads)
        save_cost_model(model, args.calibrate, **info)
        print(json.dumps({**model.to_dict(), **{k: v for k, v in info.items() if k.startswith("serving")}}))
        return 0
    if args.serving:
        raise ValueError("--serving measures the serving overhead while calibrating: give it with --calibrate OUT")
    if args.cost is None:
        raise ValueError("give --cost FILE (from livelm simulate --calibrate OUT) to simulate")
    host = load_cost_model(args.cost)
    if args.step_overhead_ms is None:
        overhead = load_serving_overhead(args.cost)
    elif math.isfinite(args.step_overhead_ms) and args.step_overhead_ms >= 0:
        overhead = args.step_overhead_ms / 1000.0
    else:
        raise ValueError(f"--step-overhead-ms must be a non-negative number, got {args.step_overhead_ms}")
    if (args.trace is None) == (args.rate is None):
        raise ValueError("give exactly one of --trace FILE or --rate R")
    if args.trace:
        requests = burstgpt_requests(args.trace, args.num_requests, args.time_scale)
    else:
        requests = synthetic_requests(args.num_requests or 200, args.rate, args.input_len, args.output_len,
                                      args.burstiness, args.seed)
    try:
        counts = [int(x) for x in args.replicas.split(",")]
    except ValueError as e:
        raise ValueError(f"--replicas takes comma-separated integers, got {args.replicas!r}") from e
    slos = parse_slos(args.slo)
    sched = SchedulerConfig(args.max_num_batched_tokens, args.max_num_seqs, args.max_model_len,
                            policy=args.scheduling_policy, tpot_slo_ms=args.tpot_slo_ms)
    for n in counts:
        result = simulate(requests, host, n, sched, CacheConfig(16, args.num_kv_blocks), args.router, seed=args.seed,
                          step_overhead_s=overhead)
        m = result.metrics(slos)
        print(json.dumps({"replicas": n, **{k: m[k] for k in ("completed", "request_throughput", "output_throughput",
                                                              "ttft_ms", "tpot_ms", "goodput", "good_fraction",
                                                              "tenants", "simulated_s", "wall_s", "speedup")
                                           if k in m}}))
    return 0
