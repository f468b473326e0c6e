"""RL serving on the default model (docs/rl.md): weight-update latency, rollout throughput
under periodic updates (``continue`` vs ``wait``), and fork/join vs sequential generation.

Three parts, in one process, on ``AsyncEngine(None)`` (the embedded SmolLM2-135M, Q4_1):

(a) update latency: a whole-model update from the model's own directory on disk, and over
    a gloo update group from a trainer process (spawned here; it sends every tensor as
    float32, as a trainer holds them; the engine requantizes to Q4_1). Idle engine; the
    median of ``--update-repeats`` updates each.
(b) rollouts: 64 concurrent rollout requests (sampled, ``sampling_logprobs``), each
    replaced by a new one as it finishes, for ``--phase-s`` seconds per mode, with a
    whole-model update from disk every ``--update-every-s`` seconds; ``continue`` then
    ``wait``, same run, same engine. Reports generated tokens per second and updates done.
(c) fork/join: a parent writes ``--preamble`` tokens, forks into 4 branches of
    ``--branch-tokens`` tokens each (greedy), joins them and writes ``--conclusion`` more;
    vs the same text generated sequentially by plain requests (parent, the 4 branches one
    after another, then the conclusion over the joined context), prefix caching on in both.
    Wall time ratio, median of ``--fork-repeats``; the tokens are checked equal.

Usage::

    python benchmarks/rl.py             # about four minutes on 2 cores
    python benchmarks/rl.py --quick     # a smoke run (records nothing)

One JSON line per part goes to ``benchmarks/results/rl.jsonl`` with the machine and its
load average at start and end (timings on a busy machine are not comparable).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import random
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO_ROOT, append_jsonl, utc_now  # noqa: E402

from livelm import AsyncEngine, SamplingParams  # noqa: E402
from livelm.bench.machine import git_commit, machine_info  # noqa: E402
from livelm.engine.fork import Branch  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results" / "rl.jsonl"
WORDS = ("the model reads a long question about prime numbers and geometry then answers it step by step "
         "with care checking every claim against what it knows about the world").split()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _trainer(model_dir: str, port: int, rounds: int) -> None:
    """Trainer process: float32 copies of the checkpoint, broadcast ``rounds`` times."""
    import torch

    from livelm.models.loader import Checkpoint, safetensors_files
    from livelm.models.weight_transfer import WeightSender
    from livelm.quant.formats import QuantizedTensor, dequantize

    torch.set_num_threads(1)
    tensors = {n: (dequantize(t) if isinstance(t, QuantizedTensor) else t).float().contiguous()
               for n, t in Checkpoint(safetensors_files(Path(model_dir))).tensors()}
    sender = WeightSender("127.0.0.1", port, world_size=2, timeout_s=300)
    for _ in range(rounds):
        sender.send(tensors)


async def bench_updates(engine: AsyncEngine, repeats: int) -> dict:
    model_dir = engine._engine.model_dir
    disk = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        await engine.update_weights(model_dir, mode="continue")
        disk.append(time.perf_counter() - t0)
    port = _free_port()
    proc = mp.get_context("spawn").Process(target=_trainer, args=(str(model_dir), port, repeats + 1))
    proc.start()
    await engine.join_update_group("127.0.0.1", port, timeout_s=300)
    # Untimed first round: it waits for the trainer to load its tensors. In the timed ones
    # the trainer is ready: the time is the transfer, the requantization and the swap.
    await engine.update_weights_from_group(mode="continue")
    group = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        await engine.update_weights_from_group(mode="continue")
        group.append(time.perf_counter() - t0)
    await asyncio.to_thread(proc.join, 60)
    num_tensors = sum(1 for _ in engine._engine.stage_weights(model_dir).names)
    return {"part": "update_latency", "disk_s": statistics.median(disk), "disk_all_s": disk,
            "group_s": statistics.median(group), "group_all_s": group, "tensors": num_tensors,
            "weight_version": engine.weight_version}


async def bench_rollouts(engine: AsyncEngine, mode: str, concurrency: int, phase_s: float,
                         every_s: float, max_tokens: int) -> dict:
    rng = random.Random(0)
    tokens = 0
    finished = 0
    updates = 0
    versions: set[int] = set()
    deadline = time.perf_counter() + phase_s
    model_dir = engine._engine.model_dir

    async def rollout() -> None:
        nonlocal tokens, finished
        while time.perf_counter() < deadline:
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 28)))
            params = SamplingParams(temperature=1.0, max_tokens=max_tokens, sampling_logprobs=True,
                                    seed=rng.randrange(1 << 30), ignore_eos=True)
            async for out in engine.generate(prompt, params):
                c = out.outputs[0]
                if time.perf_counter() < deadline:
                    tokens += len(c.token_ids)
                versions.update(c.weight_versions)
            finished += 1

    async def updater() -> None:
        nonlocal updates
        while True:
            await asyncio.sleep(every_s)
            if time.perf_counter() + 1.0 > deadline:
                return
            await engine.update_weights(model_dir, mode=mode)
            updates += 1

    t0 = time.perf_counter()
    up = asyncio.create_task(updater())
    await asyncio.gather(*(rollout() for _ in range(concurrency)))
    up.cancel()
    elapsed = min(time.perf_counter() - t0, phase_s)
    return {"part": "rollouts", "mode": mode, "concurrency": concurrency, "seconds": round(elapsed, 2),
            "tokens": tokens, "tokens_per_s": tokens / elapsed, "requests_finished": finished,
            "updates": updates, "versions_seen": len(versions), "max_tokens": max_tokens,
            "update_every_s": every_s}


async def _fork_join_once(engine: AsyncEngine, prompt: list[int], preamble: int, branch_tokens: int,
                          conclusion: int) -> tuple[float, list[int], list[list[int]], list[int], list[int]]:
    greedy = SamplingParams(temperature=0.0, max_tokens=preamble + conclusion, ignore_eos=True)
    branch = SamplingParams(temperature=0.0, max_tokens=branch_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    parent = engine.generate(prompt, greedy, request_id=f"parent-{time.monotonic_ns()}")
    rid = None
    got = 0
    async for out in parent:
        rid = out.request_id
        got += len(out.outputs[0].token_ids)
        if got >= preamble:
            await engine.pause()
            break
    fork, streams = await engine.fork(rid, [Branch(f"\n<Path>{i}:", branch) for i in range(1, 5)])
    await engine.resume()

    async def read(stream) -> list[int]:
        ids: list[int] = []
        async for o in stream:
            ids += o.outputs[0].token_ids
        return ids

    outs = await asyncio.gather(*(read(s) for s in streams))
    appended = await engine.join(rid, prefix="\n<Parallel>", separator="</Path>",
                                 suffix="</Path>\n</Parallel>\n<Conclusion>")
    tail: list[int] = []
    async for out in parent:
        tail += out.outputs[0].token_ids
    return time.perf_counter() - t0, fork.token_ids, outs, appended, tail


async def _sequential_once(engine: AsyncEngine, prompt: list[int], context: list[int], outs: list[list[int]],
                           appended: list[int], tail_len: int, branch_tokens: int) -> tuple[float, bool]:
    async def run(ids: list[int], n: int) -> list[int]:
        got: list[int] = []
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        async for o in engine.generate(ids, params):
            got += o.outputs[0].token_ids
        return got

    t0 = time.perf_counter()
    same = (await run(prompt, len(context) - len(prompt))) == context[len(prompt):]
    for i, out in enumerate(outs, start=1):
        suffix = engine.encode(f"\n<Path>{i}:")
        same &= (await run(context + suffix, branch_tokens)) == out
    same &= len(await run(context + appended, tail_len)) == tail_len
    return time.perf_counter() - t0, same


async def bench_fork_join(engine: AsyncEngine, repeats: int, preamble: int, branch_tokens: int,
                          conclusion: int) -> dict:
    prompt = engine.apply_chat_template([{"role": "user", "content": "Is 391 prime? Check it several ways."}])
    fj, seq, computed_fj = [], [], []
    same_all = True
    for _ in range(repeats):
        c0 = engine.stats().num_computed_tokens
        t, context, outs, appended, tail = await _fork_join_once(engine, prompt, preamble, branch_tokens, conclusion)
        computed_fj.append(engine.stats().num_computed_tokens - c0)
        fj.append(t)
        t_seq, same = await _sequential_once(engine, prompt, context, outs, appended, len(tail), branch_tokens)
        seq.append(t_seq)
        same_all &= same
    return {"part": "fork_join", "branches": 4, "preamble": preamble, "branch_tokens": branch_tokens,
            "conclusion": conclusion, "fork_join_s": statistics.median(fj), "sequential_s": statistics.median(seq),
            "ratio": statistics.median(fj) / statistics.median(seq), "tokens_equal": same_all,
            "computed_tokens_fork_join": statistics.median(computed_fj)}


async def main(args: argparse.Namespace) -> None:
    engine = AsyncEngine(None)
    meta = {"time": utc_now(), "commit": git_commit(), "machine": machine_info(None),
            "load_start": os.getloadavg()}
    parts = set(args.parts.split(","))
    results: list[dict] = []
    try:
        if "updates" in parts:
            results.append(await bench_updates(engine, args.update_repeats))
            print(results[-1], flush=True)
        for mode in ("continue", "wait") if "rollouts" in parts else ():
            results.append(await bench_rollouts(engine, mode, args.concurrency, args.phase_s,
                                                args.update_every_s, args.max_tokens))
            print(results[-1], flush=True)
        if "fork_join" in parts:
            results.append(await bench_fork_join(engine, args.fork_repeats, args.preamble, args.branch_tokens,
                                                 args.conclusion))
            print(results[-1], flush=True)
    finally:
        await engine.shutdown()
    meta["load_end"] = os.getloadavg()
    if args.quick:
        return  # a smoke run records nothing
    for record in results:
        append_jsonl(RESULTS, {**meta, **record})


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run (seconds, not minutes)")
    ap.add_argument("--parts", default="updates,rollouts,fork_join", help="comma-separated parts to run")
    ap.add_argument("--update-repeats", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--phase-s", type=float, default=60.0)
    ap.add_argument("--update-every-s", type=float, default=10.0)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--fork-repeats", type=int, default=3)
    ap.add_argument("--preamble", type=int, default=32)
    ap.add_argument("--branch-tokens", type=int, default=64)
    ap.add_argument("--conclusion", type=int, default=32)
    args = ap.parse_args()
    if args.quick:
        args.update_repeats, args.phase_s, args.update_every_s, args.fork_repeats = 1, 8.0, 3.0, 1
        args.concurrency, args.max_tokens = 16, 32
    asyncio.run(main(args))
