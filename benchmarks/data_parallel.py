"""Data parallelism: the cache-aware router vs round robin at DP=2, and the router's cost.

Two measurements, each against a baseline run in the same script (greedy, ignore_eos,
random prompt token ids, seeded; an untimed warm-up request first):

(a) multi-turn sessions at ``data_parallel_size=2``: C conversations x T turns, each turn
    = the whole history (a shared system prompt, earlier turns and replies) + new user
    tokens, run as a session, conversations concurrent. ``cache_aware`` vs ``round_robin``
    router. Reports the mean TTFT of turns >= 2, the cached-token fraction of those turns'
    prompts (from ``RequestOutput.num_cached_tokens``), and the TTFT ratio.
(b) router overhead: N short requests one after another, DP=1 through
    :class:`~livelm.serving.dp_engine.DataParallelEngine` (router + replica process) vs the
    plain :class:`~livelm.engine.async_engine.AsyncEngine`; mean seconds per request, their
    difference, and the router's own time per request (``route_seconds``).

Usage::

    python benchmarks/data_parallel.py --random-smollm2-shape /tmp/smollm2-random [--quick]

One JSON line goes to ``benchmarks/results/data_parallel.jsonl``, with the load average at
start and end (figures taken on a busy machine are not comparable).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO_ROOT, append_jsonl, utc_now  # noqa: E402

from livelm.bench.machine import git_commit  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results" / "data_parallel.jsonl"


def _params(max_tokens: int):  # noqa: ANN202 - SamplingParams, imported late
    from livelm import SamplingParams
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


async def _first_and_all(engine, prompt: list[int], max_tokens: int, session: str | None):  # noqa: ANN001, ANN202
    """(TTFT seconds, output ids, cached prompt tokens) of one request."""
    t0 = time.perf_counter()
    ttft, ids, cached = None, [], 0
    async for out in engine.generate(prompt, _params(max_tokens), session_id=session):
        ttft = ttft if ttft is not None else time.perf_counter() - t0
        ids += out.outputs[0].token_ids
        cached = out.num_cached_tokens or cached
    return ttft, ids, cached


async def _conversations(engine, args: argparse.Namespace, rng: random.Random, vocab: int) -> dict:  # noqa: ANN001
    system = [rng.randrange(3, vocab) for _ in range(args.system)]

    async def one(c: int) -> list[tuple[float, int, int]]:
        history = list(system)
        rows = []
        for turn in range(args.turns):
            history += [rng.randrange(3, vocab) for _ in range(args.user)]
            ttft, ids, cached = await _first_and_all(engine, history, args.output, f"conv-{c}")
            if turn >= 1:
                rows.append((ttft, cached, len(history)))
            history += ids
        await engine.close_session(f"conv-{c}")
        return rows

    rows = [r for rs in await asyncio.gather(*(one(c) for c in range(args.conversations))) for r in rs]
    return {"mean_ttft_turn2plus_s": sum(r[0] for r in rows) / len(rows),
            "cached_fraction_turn2plus": sum(r[1] for r in rows) / sum(r[2] for r in rows)}


def _engine_kwargs(args: argparse.Namespace, max_len: int) -> dict:
    return {"max_model_len": max_len, "num_threads": args.threads, "session_ttl_s": 120.0,
            "kv_cache_gib": args.kv_gib}


def workload_a(model: Path, args: argparse.Namespace, vocab: int) -> dict:
    """Sessions at DP=2: cache_aware vs round_robin."""
    from livelm.serving.dp_engine import DataParallelEngine

    max_len = args.system + args.turns * (args.user + args.output) + 16
    out = {}
    for router in ("round_robin", "cache_aware"):
        engine = DataParallelEngine(str(model), data_parallel_size=2, router=router,
                                    **_engine_kwargs(args, max_len))

        async def run(engine=engine) -> dict:  # noqa: ANN001
            await _first_and_all(engine, list(range(3, 23)), 2, None)  # warm-up
            result = await _conversations(engine, args, random.Random(0), vocab)
            await engine.shutdown()
            return result
        out[router] = asyncio.run(run())
    out["ttft_ratio_round_robin_over_cache_aware"] = (
        out["round_robin"]["mean_ttft_turn2plus_s"] / out["cache_aware"]["mean_ttft_turn2plus_s"])
    return out


def workload_b(model: Path, args: argparse.Namespace) -> dict:
    """Router overhead: DP=1 through the router vs the plain engine."""
    from livelm.engine.async_engine import AsyncEngine
    from livelm.serving.dp_engine import DataParallelEngine

    out = {}
    prompt = list(range(3, 35))
    for name in ("plain", "router_dp1"):
        kw = _engine_kwargs(args, 128)
        engine = (AsyncEngine(str(model), **kw) if name == "plain"
                  else DataParallelEngine(str(model), data_parallel_size=1, **kw))

        async def run(engine=engine) -> float:  # noqa: ANN001
            await _first_and_all(engine, prompt, 2, None)
            t0 = time.perf_counter()
            for _ in range(args.overhead_requests):
                await _first_and_all(engine, prompt, args.overhead_tokens, None)
            seconds = (time.perf_counter() - t0) / args.overhead_requests
            route = getattr(engine, "route_seconds", None)
            await engine.shutdown()
            return seconds, route
        seconds, route = asyncio.run(run())
        out[f"{name}_s_per_request"] = seconds
        if route is not None:
            out["route_s_per_request"] = route / (args.overhead_requests + 1)
    out["overhead_s_per_request"] = out["router_dp1_s_per_request"] - out["plain_s_per_request"]
    return out


def _build_in_child(directory: str) -> Path:
    """build_random_smollm2_shape(directory), run in a fresh interpreter."""
    import subprocess

    code = ("import sys; from livelm.bench.random_model import build_random_smollm2_shape; "
            "print(build_random_smollm2_shape(sys.argv[1]))")
    out = subprocess.run([sys.executable, "-c", code, directory], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    """Run both measurements, print them and append one JSON line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", help="model directory")
    p.add_argument("--random-smollm2-shape", metavar="DIR", help="build/reuse a random SmolLM2-135M-shaped model")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    p.add_argument("--threads", type=int, default=2, help="threads in all (split between replicas)")
    p.add_argument("--kv-gib", type=float, default=0.25)
    args = p.parse_args(argv)
    if bool(args.model) == bool(args.random_smollm2_shape):
        p.error("give a model directory or --random-smollm2-shape DIR (one of them)")
    sizes = ({"conversations": 4, "turns": 3, "system": 64, "user": 16, "output": 8,
              "overhead_requests": 5, "overhead_tokens": 4} if args.quick else
             # Agent-like sessions: each turn brings a lot of its own context (tool output,
             # retrieved text) and the shared system prompt is short, so a turn that lands
             # on the replica without the session's KV recomputes most of its history.
             {"conversations": 4, "turns": 6, "system": 64, "user": 200, "output": 32,
              "overhead_requests": 40, "overhead_tokens": 8})
    for k, v in sizes.items():
        setattr(args, k, v)
    # Built in a child process: torch work on this process's main thread would leave an
    # OpenMP thread pool behind that slows the plain AsyncEngine of (b) (docs/serving.md).
    model = Path(args.model) if args.model else _build_in_child(args.random_smollm2_shape)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    load_start = list(os.getloadavg())
    print(f"load average at start: {load_start}")
    record = {"benchmark": "data_parallel", "time": utc_now(), "commit": git_commit(), "quick": args.quick,
              "sizes": sizes, "threads": args.threads, "loadavg_start": load_start,
              "sessions_dp2": workload_a(model, args, vocab), "router_overhead": workload_b(model, args)}
    record["loadavg_end"] = list(os.getloadavg())
    print(json.dumps(record, indent=2))
    print(f"load average at end: {record['loadavg_end']} (figures taken under this load)")
    append_jsonl(RESULTS, record)


if __name__ == "__main__":
    main()
