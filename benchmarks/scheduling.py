"""Scheduling (issue 25): fairness between tenants, and the simulator against real runs.

Parts (``--parts``, default all, in this order):

- **tenants**: one engine (the default model, 256-token step budget) per policy, fcfs
  then fair. A heavy tenant floods ``--flood`` requests (256-token prompts, 32 output
  tokens) at once; a light
  tenant sends one short request (32 tokens, 16 out) every 0.5 s meanwhile. Reported:
  the light tenant's TTFT p50/p99 under each policy and their ratio (target: fair >= 5x
  lower p99), and the heavy tenant's.
- **accuracy**: the step cost model is calibrated on this host (``livelm simulate
  --calibrate --serving``'s workload, on an in-process engine, then the serving overhead per
  step from single requests served one at a time, with prompts of their own), then ``livelm bench sweep`` runs the
  default model behind a real ``livelm serve`` at two request rates (``--rates``;
  ``--accuracy-requests`` requests of 128 prompt / 32 output tokens, Poisson, token-id
  prompts), and the simulator replays the same arrivals and lengths: TTFT and TPOT
  medians side by side (target: within 20%).
- **replay**: the simulator replays the synthetic BurstGPT trace (benchmarks/traces/)
  time-scaled to a range of rates on 1, 8 and 64 replicas with the calibrated model:
  goodput under the SLOs (``--slo``) against the offered rate, one curve per replica
  count (``benchmarks/results/scheduling_goodput.png``), and the simulator's speed.

Usage::

    python benchmarks/scheduling.py                   # everything (~15 min on 2 cores)
    python benchmarks/scheduling.py --parts replay    # needs a cost model from an earlier run

Results: stdout and one JSON line per part in ``benchmarks/results/scheduling.jsonl``;
the calibrated model in ``benchmarks/results/step_cost.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO_ROOT, append_jsonl, utc_now  # noqa: E402

from livelm import SamplingParams  # noqa: E402
from livelm.bench.machine import git_commit, machine_info  # noqa: E402
from livelm.bench.metrics import parse_slos, percentile  # noqa: E402
from livelm.config import CacheConfig, SchedulerConfig  # noqa: E402
from livelm.sim.calibrate import (  # noqa: E402
    calibrate,
    load_cost_model,
    measure_serving_overhead,
    save_cost_model,
)
from livelm.sim.cluster import simulate  # noqa: E402
from livelm.sim.workload import burstgpt_requests, synthetic_requests  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results" / "scheduling.jsonl"
COST = REPO_ROOT / "benchmarks" / "results" / "step_cost.json"
PLOT = REPO_ROOT / "benchmarks" / "results" / "scheduling_goodput.png"
TRACE = REPO_ROOT / "benchmarks" / "traces" / "burstgpt_synthetic.csv"


# ------------------------------------------------------------------------- tenants


async def _tenant_run(policy: str, flood: int, light: int, threads: int, budget: int) -> dict:
    from livelm.engine.async_engine import AsyncEngine

    engine = AsyncEngine(None, num_threads=threads, scheduling_policy=policy, max_model_len=2048,
                         max_num_batched_tokens=budget)
    vocab = min(len(engine.tokenizer), 40_000)  # ids every model of this tokenizer has
    warm = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    async for _ in engine.generate([5] * 64, warm):
        pass

    async def one(tenant: str, ids: list[int], out_tokens: int, delay: float) -> float:
        await asyncio.sleep(delay)
        params = SamplingParams(temperature=0, max_tokens=out_tokens, ignore_eos=True, extra={"tenant": tenant})
        t0 = time.perf_counter()
        ttft = None
        async for _ in engine.generate(ids, params):
            if ttft is None:
                ttft = time.perf_counter() - t0
        return ttft or 0.0

    base = 1000
    heavy = [one("heavy", [(base + i * 997 + j) % vocab for j in range(256)], 32, 0.0) for i in range(flood)]
    light_ids = [[(base + 50_000 + i * 991 + j) % vocab for j in range(32)] for i in range(light)]
    lights = [one("light", ids, 16, 0.25 + 0.5 * i) for i, ids in enumerate(light_ids)]
    started = time.perf_counter()
    results = await asyncio.gather(*heavy, *lights)
    wall = time.perf_counter() - started
    await engine.shutdown()
    h, lt = results[:flood], results[flood:]
    return {"policy": policy, "wall_s": wall,
            "light_ttft_ms": {"p50": statistics.median(lt) * 1e3, "p99": percentile(lt, 99) * 1e3},
            "heavy_ttft_ms": {"p50": statistics.median(h) * 1e3, "p99": percentile(h, 99) * 1e3}}


def part_tenants(args: argparse.Namespace) -> dict:
    runs = {p: asyncio.run(_tenant_run(p, args.flood, args.light, args.threads, args.tenant_budget))
            for p in ("fcfs", "fair")}
    ratio = runs["fcfs"]["light_ttft_ms"]["p99"] / runs["fair"]["light_ttft_ms"]["p99"]
    for p, r in runs.items():
        print(f"[tenants] {p:5s}: light TTFT p50 {r['light_ttft_ms']['p50']:8.0f} ms, p99 "
              f"{r['light_ttft_ms']['p99']:8.0f} ms; heavy TTFT p50 {r['heavy_ttft_ms']['p50']:8.0f} ms, "
              f"p99 {r['heavy_ttft_ms']['p99']:8.0f} ms; all done in {r['wall_s']:.1f} s")
    print(f"[tenants] light tenant's TTFT p99: fair {ratio:.1f}x lower than fcfs (target >= 5x)")
    return {"part": "tenants", "flood": args.flood, "light": args.light, "max_num_batched_tokens": args.tenant_budget,
            "runs": runs, "light_p99_ratio": ratio}


# ------------------------------------------------------------------------ accuracy


def _calibrated(args: argparse.Namespace):
    from livelm.engine.llm import LLM

    llm = LLM(None, num_threads=args.threads)
    t0 = time.perf_counter()
    model, samples = calibrate(llm.engine, num_requests=args.calibration_requests, seed=args.seed)
    errors = sorted(abs(model.predict(s) / y - 1) for s, y in samples)
    fit = {"steps": len(samples), "seconds": time.perf_counter() - t0,
           "median_rel_error": errors[len(errors) // 2], "p90_rel_error": errors[int(0.9 * len(errors))]}
    save_cost_model(model, COST, model=llm.engine.model_name, date=utc_now(), **fit)
    print(f"[calibrate] {len(samples)} steps in {fit['seconds']:.0f} s: coefficients {model.coefficients}; "
          f"fit error median {fit['median_rel_error']:.1%}, p90 {fit['p90_rel_error']:.1%}")
    del llm
    return model, fit


def _bench_sweep(rates: list[float], num: int, seed: int, threads: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "livelm.entrypoints.cli", "bench", "sweep", "--rates",
               ",".join(f"{r:g}" for r in rates), "--num-requests", str(num), "--input-len", "128",
               "--output-len", "32", "--prompt-format", "ids", "--seed", str(seed), "--result-dir", tmp,
               "--name", "accuracy", "--no-progress", "--warmup", "2"]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run(cmd, check=True, env=env, cwd=REPO_ROOT)
        return [json.loads(line) for line in (Path(tmp) / "accuracy.jsonl").read_text().splitlines()]


def part_accuracy(args: argparse.Namespace) -> dict:
    model, fit = _calibrated(args)
    overhead, probe_tpot = measure_serving_overhead(model, threads=args.threads, seed=args.seed + 1)
    print(f"[calibrate] serving overhead {overhead * 1000:.2f} ms per step (single requests: TPOT p50 "
          f"{probe_tpot:.1f} ms)")
    real = _bench_sweep(args.rates, args.accuracy_requests, args.seed, args.threads)
    rows = []
    for rec in real:
        rate = rec["arrivals"]["rate"]
        m = rec["metrics"]
        reqs = synthetic_requests(args.accuracy_requests, rate, 128, 32, seed=args.seed)
        sim = simulate(reqs, model, 1, SchedulerConfig(2048, 128, 2048), CacheConfig(16, 4096),
                       step_overhead_s=overhead).metrics()
        engine_only = simulate(reqs, model, 1, SchedulerConfig(2048, 128, 2048), CacheConfig(16, 4096)).metrics()
        row = {"rate": rate,
               "real": {"ttft_p50_ms": m["ttft_ms"]["p50"], "tpot_p50_ms": m["tpot_ms"]["p50"]},
               "sim": {"ttft_p50_ms": sim["ttft_ms"]["p50"], "tpot_p50_ms": sim["tpot_ms"]["p50"]},
               "sim_without_overhead": {"ttft_p50_ms": engine_only["ttft_ms"]["p50"],
                                        "tpot_p50_ms": engine_only["tpot_ms"]["p50"]}}
        row["ttft_error"] = row["sim"]["ttft_p50_ms"] / row["real"]["ttft_p50_ms"] - 1
        row["tpot_error"] = row["sim"]["tpot_p50_ms"] / row["real"]["tpot_p50_ms"] - 1
        rows.append(row)
        print(f"[accuracy] rate {rate:g}/s: TTFT p50 real {row['real']['ttft_p50_ms']:.0f} ms, simulated "
              f"{row['sim']['ttft_p50_ms']:.0f} ms ({row['ttft_error']:+.0%}); TPOT p50 real "
              f"{row['real']['tpot_p50_ms']:.1f} ms, simulated {row['sim']['tpot_p50_ms']:.1f} ms "
              f"({row['tpot_error']:+.0%}) (target: within 20%); without the serving overhead: TTFT "
              f"{row['sim_without_overhead']['ttft_p50_ms']:.0f} ms, TPOT {row['sim_without_overhead']['tpot_p50_ms']:.1f} ms")
    return {"part": "accuracy", "calibration": fit, "coefficients": list(model.coefficients),
            "serving_overhead_s": overhead, "probe_tpot_p50_ms": probe_tpot, "rows": rows}


# -------------------------------------------------------------------------- replay


def part_replay(args: argparse.Namespace) -> dict:
    model = load_cost_model(COST)
    slos = parse_slos(args.slo)
    curves: dict[int, list[dict]] = {}
    for n in (1, 8, 64):
        for scale in args.time_scales:
            reqs = burstgpt_requests(TRACE, time_scale=scale)
            offered = len(reqs) / max(r.arrival_s for r in reqs)
            res = simulate(reqs, model, n, SchedulerConfig(2048, 128, 2048), CacheConfig(16, 4096))
            m = res.metrics(slos)
            curves.setdefault(n, []).append({"time_scale": scale, "offered_rate": offered, "goodput": m["goodput"],
                                             "good_fraction": m["good_fraction"],
                                             "ttft_p50_ms": m["ttft_ms"]["p50"], "tpot_p50_ms": m["tpot_ms"]["p50"],
                                             "simulated_s": res.simulated_s, "wall_s": res.wall_s,
                                             "speedup": res.speedup, "steps": res.steps})
        best = max(curves[n], key=lambda c: c["goodput"])
        print(f"[replay] {n:2d} replicas: best goodput {best['goodput']:.2f} req/s at "
              f"{best['offered_rate']:.2f} req/s offered; simulator "
              f"{min(c['speedup'] for c in curves[n]):.0f}-{max(c['speedup'] for c in curves[n]):.0f}x real time")
    _plot(curves, slos)
    return {"part": "replay", "slos_ms": slos, "curves": {str(k): v for k, v in curves.items()}}


def _plot(curves: dict[int, list[dict]], slos: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    for n, points in curves.items():
        pts = sorted(points, key=lambda p: p["offered_rate"])
        ax.plot([p["offered_rate"] for p in pts], [p["goodput"] for p in pts], marker="o", label=f"{n} replicas")
    ax.set_xscale("log")
    ax.set_xlabel("offered request rate (req/s, synthetic BurstGPT trace time-scaled)")
    ax.set_ylabel("goodput (req/s meeting " + ", ".join(f"{k}<={v:g}ms" for k, v in slos.items()) + ")")
    ax.set_title("Simulated goodput, default model's calibrated step cost")
    ax.legend()
    fig.savefig(PLOT, dpi=110)
    print(f"[replay] plot: {PLOT}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="tenants,accuracy,replay")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--flood", type=int, default=24, help="heavy tenant's requests")
    p.add_argument("--light", type=int, default=8, help="light tenant's requests")
    p.add_argument("--tenant-budget", type=int, default=256,
                   help="token budget per step in the tenants part (chunked prefill: a step is short, "
                        "so a policy can act between the flood's chunks)")
    p.add_argument("--calibration-requests", type=int, default=48)
    p.add_argument("--accuracy-requests", type=int, default=24)
    p.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=[0.5, 2.0])
    p.add_argument("--time-scales", type=lambda s: [float(x) for x in s.split(",")],
                   default=[4.0, 1.0, 0.5, 0.25, 0.1, 0.05, 0.02, 0.01, 0.005])
    p.add_argument("--slo", action="append", default=None, metavar="METRIC=MS")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    args.slo = args.slo or ["ttft=2000", "tpot=200"]
    return args


def main(argv: list[str] | None = None) -> None:
    """Run the chosen parts; print and save each."""
    args = parse_args(argv)
    parts = {"tenants": part_tenants, "accuracy": part_accuracy, "replay": part_replay}
    for name in args.parts.split(","):
        if name not in parts:
            raise SystemExit(f"unknown part {name!r}; choose from {', '.join(parts)}")
        start = machine_info(args.threads)
        result = parts[name](args)
        end = machine_info(args.threads)
        print(f"[{name}] load average: start {start['loadavg']}, end {end['loadavg']}")
        if not args.no_save:
            append_jsonl(RESULTS, {"time": utc_now(), "commit": git_commit(), "machine": start,
                                   "loadavg_end": end["loadavg"], **result})


if __name__ == "__main__":
    main()
