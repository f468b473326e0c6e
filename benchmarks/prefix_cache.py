"""Prefix caching, sessions and prefix-grouped batches: livelm with each feature on vs off.

Three workloads, each run twice in the same process on fresh engines (greedy, ignore_eos,
random prompt token ids, seeded; an untimed warm-up first):

(a) shared system prompt: 64 requests = one 1,024-token system prompt + 64 unique tokens,
    64 output tokens each, through ``LLM.generate``; prefix caching on vs off. Reports
    throughput (requests and tokens per second) and the on/off ratio.
(b) multi-turn sessions: 16 conversations x 8 turns on ``AsyncEngine``, each turn = the
    whole history (shared 256-token system prompt, earlier turns and replies) + new user
    tokens (64 in the first turn, then 16..48), 32 output tokens, then a pause of 0.5..1.5 s (the user reading, or a tool
    call) before the next turn. "on" = prefix caching + a session per conversation; "off"
    = neither. Reports the mean time to first token (TTFT) of turns >= 2 and the ratio.
(c) prefix-grouped vs arrival order: 8 prefixes x 8 requests (512-token prefix + 32 unique
    tokens, 16 output tokens), shuffled, on a KV pool too small to hold every prefix at once;
    prefix caching on in both runs, ``LLM.generate(group_prefixes=True / False)``.
    Reports wall time and the ratio.

Usage::

    python benchmarks/prefix_cache.py --random-smollm2-shape /tmp/smollm2-random
    python benchmarks/prefix_cache.py --random-smollm2-shape /tmp/smollm2-random --quick

Results go to stdout and, one JSON line per workload, to
``benchmarks/results/prefix_cache.jsonl`` (with the machine's load average at start and
end: timings on a busy machine are not comparable).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO_ROOT, append_jsonl, utc_now  # noqa: E402

from livelm.bench.machine import git_commit, machine_info  # noqa: E402
from livelm.bench.random_model import build_random_smollm2_shape  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results" / "prefix_cache.jsonl"


@dataclass(frozen=True)
class Sizes:
    """Workload sizes (the full ones, or ``--quick``'s)."""

    a_requests: int = 64
    a_system: int = 1024
    a_unique: int = 64
    a_output: int = 64
    b_conversations: int = 16
    b_turns: int = 8
    b_system: int = 256
    b_first_user: int = 64
    b_user: tuple[int, int] = (16, 48)
    b_output: int = 32
    b_pause: tuple[float, float] = (0.5, 1.5)
    c_prefixes: int = 8
    c_per_prefix: int = 8
    c_prefix: int = 512
    c_unique: int = 32
    c_output: int = 16
    c_pool_prefixes: float = 3.0  # the pool holds about this many prefixes' worth of KV


QUICK = Sizes(
    a_requests=4,
    a_system=128,
    a_unique=8,
    a_output=4,
    b_conversations=2,
    b_turns=3,
    b_system=32,
    b_first_user=16,
    b_user=(4, 8),
    b_output=4,
    b_pause=(0.01, 0.02),
    c_prefixes=3,
    c_per_prefix=2,
    c_prefix=64,
    c_unique=8,
    c_output=2,
    c_pool_prefixes=2.0,
)


def _tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    # Ids above the special tokens; any id works for a random-weight model.
    return [rng.randrange(3, vocab) for _ in range(n)]


def _engine_kwargs(args: argparse.Namespace, caching: bool, **extra) -> dict:
    return dict(num_threads=args.threads, enable_prefix_caching=caching, dtype="float32", **extra)


def _warm_up(llm, vocab: int) -> None:
    from livelm import SamplingParams

    rng = random.Random(123)
    llm.generate(
        [_tokens(rng, 20, vocab), _tokens(rng, 17, vocab)],
        SamplingParams(temperature=0, max_tokens=2, ignore_eos=True),
        use_tqdm=False,
    )


def _free(obj) -> None:
    del obj
    gc.collect()


# --------------------------------------------------------------------------- (a)


def workload_a(model: Path, args: argparse.Namespace, sz: Sizes, vocab: int) -> dict:
    """Shared system prompt, caching on vs off: throughput ratio."""
    from livelm import SamplingParams
    from livelm.engine.llm import LLM

    rng = random.Random(0)
    system = _tokens(rng, sz.a_system, vocab)
    prompts = [system + _tokens(rng, sz.a_unique, vocab) for _ in range(sz.a_requests)]
    params = SamplingParams(temperature=0, max_tokens=sz.a_output, ignore_eos=True)
    total_len = sz.a_system + sz.a_unique + sz.a_output
    blocks = sz.a_requests * -(-total_len // 16) + 64
    record: dict = {}
    outputs = {}
    for caching in (False, True):
        llm = LLM(
            str(model),
            **_engine_kwargs(args, caching, num_kv_blocks=blocks, max_model_len=total_len + 16),
        )
        _warm_up(llm, vocab)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        stats = llm.engine.stats()
        outputs[caching] = [o.outputs[0].token_ids for o in outs]
        tokens = sum(len(p) for p in prompts) + sz.a_requests * sz.a_output
        record["on" if caching else "off"] = {
            "seconds": seconds,
            "requests_per_s": sz.a_requests / seconds,
            "tokens_per_s": tokens / seconds,
            "output_tokens_per_s": sz.a_requests * sz.a_output / seconds,
            "hit_tokens": stats.prefix_cache_hit_tokens,
            "queried_tokens": stats.prefix_cache_queried_tokens,
        }
        _free(llm)
    record["throughput_ratio"] = record["off"]["seconds"] / record["on"]["seconds"]
    record["outputs_identical"] = outputs[True] == outputs[False]
    return record


# --------------------------------------------------------------------------- (b)


async def _conversations(engine, sz: Sizes, vocab: int, sessions: bool) -> list[list[float]]:
    """Run every conversation concurrently; returns the TTFTs of each one's turns."""
    from livelm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=sz.b_output, ignore_eos=True)
    rng = random.Random(1)
    system = _tokens(rng, sz.b_system, vocab)
    scripts = [
        [_tokens(rng, sz.b_first_user, vocab)]
        + [_tokens(rng, rng.randint(*sz.b_user), vocab) for _ in range(sz.b_turns - 1)]
        for _ in range(sz.b_conversations)
    ]
    pauses = [[rng.uniform(*sz.b_pause) for _ in range(sz.b_turns)] for _ in scripts]

    async def one(c: int) -> list[float]:
        history = list(system)
        ttfts = []
        for turn, user in enumerate(scripts[c]):
            history += user
            t0 = time.perf_counter()
            first = None
            reply: list[int] = []
            async for out in engine.generate(
                list(history), params, session_id=f"conv-{c}" if sessions else None
            ):
                if first is None and out.outputs and out.outputs[0].token_ids:
                    first = time.perf_counter() - t0
                reply += out.outputs[0].token_ids if out.outputs else []
            ttfts.append(first)
            history += reply
            if turn + 1 < sz.b_turns:
                await asyncio.sleep(pauses[c][turn])
        if sessions:
            await engine.close_session(f"conv-{c}")
        return ttfts

    return await asyncio.gather(*(one(c) for c in range(sz.b_conversations)))


def workload_b(model: Path, args: argparse.Namespace, sz: Sizes, vocab: int) -> dict:
    """Multi-turn conversations, sessions + caching on vs off: mean TTFT of turns >= 2."""
    from livelm.engine.async_engine import AsyncEngine

    max_len = (
        sz.b_system + sz.b_first_user + (sz.b_turns - 1) * sz.b_user[1] + sz.b_turns * sz.b_output
    )
    record: dict = {}
    for on in (False, True):
        engine = AsyncEngine(
            str(model),
            **_engine_kwargs(
                args,
                on,
                max_model_len=max_len + 16,
                session_ttl_s=60.0,
                num_kv_blocks=sz.b_conversations * -(-max_len // 16) + 64,
            ),
        )

        async def run(engine=engine, on=on):
            from livelm import SamplingParams

            # Untimed warm-up through the same engine.
            async for _ in engine.generate(
                list(range(3, 23)), SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
            ):
                pass
            t0 = time.perf_counter()
            ttfts = await _conversations(engine, sz, vocab, sessions=on)
            seconds = time.perf_counter() - t0
            stats = engine.stats()
            await engine.shutdown()
            return ttfts, seconds, stats

        ttfts, seconds, stats = asyncio.run(run())
        later = [t for conv in ttfts for t in conv[1:]]
        record["on" if on else "off"] = {
            "seconds": seconds,
            "mean_ttft_turn1_s": sum(conv[0] for conv in ttfts) / len(ttfts),
            "mean_ttft_later_turns_s": sum(later) / len(later),
            "max_ttft_later_turns_s": max(later),
            "hit_tokens": stats.prefix_cache_hit_tokens,
            "queried_tokens": stats.prefix_cache_queried_tokens,
            "pins_dropped": stats.num_session_pins_dropped,
            "preemptions": stats.num_preemptions,
        }
        _free(engine)
    record["ttft_ratio"] = (
        record["off"]["mean_ttft_later_turns_s"] / record["on"]["mean_ttft_later_turns_s"]
    )
    return record


# --------------------------------------------------------------------------- (c)


def workload_c(model: Path, args: argparse.Namespace, sz: Sizes, vocab: int) -> dict:
    """Shuffled shared-prefix batch on a small pool: prefix-grouped vs arrival order."""
    from livelm import SamplingParams
    from livelm.engine.llm import LLM

    rng = random.Random(2)
    prefixes = [_tokens(rng, sz.c_prefix, vocab) for _ in range(sz.c_prefixes)]
    prompts = [
        p + _tokens(rng, sz.c_unique, vocab) for p in prefixes for _ in range(sz.c_per_prefix)
    ]
    rng.shuffle(prompts)
    params = SamplingParams(temperature=0, max_tokens=sz.c_output, ignore_eos=True)
    prefix_blocks = sz.c_prefix // 16
    request_blocks = -(-(sz.c_prefix + sz.c_unique + sz.c_output) // 16)
    num_blocks = max(int(sz.c_pool_prefixes * prefix_blocks), 2 * request_blocks)
    record: dict = {
        "num_kv_blocks": num_blocks,
        "blocks_for_all_prefixes": sz.c_prefixes * prefix_blocks,
    }
    outputs = {}
    for grouped in (False, True):
        llm = LLM(
            str(model),
            **_engine_kwargs(
                args, True, num_kv_blocks=num_blocks, max_model_len=request_blocks * 16
            ),
        )
        _warm_up(llm, vocab)
        before = llm.engine.stats()
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False, group_prefixes=grouped)
        seconds = time.perf_counter() - t0
        stats = llm.engine.stats()
        outputs[grouped] = [o.outputs[0].token_ids for o in outs]
        record["grouped" if grouped else "arrival"] = {
            "seconds": seconds,
            "requests_per_s": len(prompts) / seconds,
            "hit_tokens": stats.prefix_cache_hit_tokens - before.prefix_cache_hit_tokens,
            "queried_tokens": stats.prefix_cache_queried_tokens
            - before.prefix_cache_queried_tokens,
            "evictions": stats.num_cache_evictions - before.num_cache_evictions,
            "preemptions": stats.num_preemptions - before.num_preemptions,
        }
        _free(llm)
    record["speedup_grouped_over_arrival"] = (
        record["arrival"]["seconds"] / record["grouped"]["seconds"]
    )
    record["outputs_identical"] = outputs[True] == outputs[False]
    return record


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default=None, help="a local Hugging Face model directory")
    p.add_argument(
        "--random-smollm2-shape",
        metavar="DIR",
        default=None,
        help="build (once) and use a random-weight model of SmolLM2-135M's shape in DIR",
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes: a smoke run of well under a minute"
    )
    p.add_argument("--workloads", default="a,b,c", help="comma-separated subset of a,b,c")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--no-save", action="store_true", help="do not append to the results file")
    args = p.parse_args(argv)
    if (args.model is None) == (args.random_smollm2_shape is None):
        p.error("give a model directory or --random-smollm2-shape DIR (one of them)")
    return args


def main(argv: list[str] | None = None) -> None:
    """Run the chosen workloads and print their figures."""
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    model = (
        Path(args.model) if args.model else build_random_smollm2_shape(args.random_smollm2_shape)
    )
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    sizes = QUICK if args.quick else Sizes()
    runners = {"a": workload_a, "b": workload_b, "c": workload_c}
    for name in args.workloads.split(","):
        start = machine_info(args.threads)
        t0 = time.perf_counter()
        result = runners[name](model, args, sizes, vocab)
        record = {
            "benchmark": "prefix_cache",
            "workload": name,
            "quick": args.quick,
            "date": utc_now(),
            "commit": git_commit(),
            "model": str(model),
            "sizes": {k: v for k, v in vars(sizes).items() if k.startswith(name + "_")},
            "machine": start,
            "loadavg_end": list(os.getloadavg()),
            "wall_s": time.perf_counter() - t0,
            **result,
        }
        _print(name, record)
        if not args.no_save:
            append_jsonl(RESULTS, record)


def _print(name: str, r: dict) -> None:
    load = f"load {r['machine']['loadavg']} -> {[round(x, 2) for x in r['loadavg_end']]}"
    if name == "a":
        print(
            f"(a) shared system prompt: off {r['off']['seconds']:.1f}s "
            f"({r['off']['requests_per_s']:.2f} req/s), on {r['on']['seconds']:.1f}s "
            f"({r['on']['requests_per_s']:.2f} req/s): throughput x{r['throughput_ratio']:.2f}; "
            f"outputs identical: {r['outputs_identical']}; {load}"
        )
    elif name == "b":
        print(
            f"(b) sessions: mean TTFT of turns >= 2 off {r['off']['mean_ttft_later_turns_s'] * 1e3:.0f} ms, "
            f"on {r['on']['mean_ttft_later_turns_s'] * 1e3:.0f} ms: x{r['ttft_ratio']:.2f} lower "
            f"(turn 1: off {r['off']['mean_ttft_turn1_s'] * 1e3:.0f} ms, "
            f"on {r['on']['mean_ttft_turn1_s'] * 1e3:.0f} ms); {load}"
        )
    else:
        print(
            f"(c) prefix-grouped vs arrival order ({r['num_kv_blocks']} blocks for "
            f"{r['blocks_for_all_prefixes']} blocks of prefixes): arrival {r['arrival']['seconds']:.1f}s, "
            f"grouped {r['grouped']['seconds']:.1f}s: x{r['speedup_grouped_over_arrival']:.2f}; "
            f"outputs identical: {r['outputs_identical']}; {load}"
        )


if __name__ == "__main__":
    main()
