"""Streaming input: TTFT after the last piece of a prompt, streamed vs prefilled at the end.

A retrieval-like arrival: a 4,096-token context comes in 16 pieces spread over 8 seconds,
then a short question. Two arms, each repeated, in one process on one engine (each run
under its own cache salt, so no arm reuses another's KV):

- **streaming**: every piece goes into an ``InputStream`` as it arrives and is prefilled
  in the background; after the last piece the question is appended, the input closed and
  the reply started.
- **one-shot**: the client waits for the whole context (the same arrival times), then
  sends context + question as one prompt.

TTFT is measured from the moment the last piece (with the question) is available to the
first output token. Then the cost to others: the TPOT (time per output token after the
first) of 8 concurrent ordinary requests, alone vs while a streaming session receives its
pieces and replies.

Usage::

    python benchmarks/streaming_input.py                 # the embedded default model
    python benchmarks/streaming_input.py --model DIR --reps 3

Results: stdout and one JSON line in ``benchmarks/results/streaming_input.jsonl``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO_ROOT, append_jsonl, utc_now  # noqa: E402

from livelm import SamplingParams  # noqa: E402
from livelm.bench.machine import git_commit, machine_info  # noqa: E402
from livelm.engine.async_engine import AsyncEngine  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results" / "streaming_input.jsonl"
QUESTION = "\n\nQuestion: Which city is mentioned most often in the notes above? Answer:"
_WORDS = (
    "the report notes that revenue in Paris grew while Berlin stayed flat and Madrid "
    "recovered after a slow spring; analysts expect Lisbon to follow, although costs rose "
    "in every office, shipping delays hit Rome, and a new team in Vienna started on Monday "
    "with two projects on energy storage, one on water, and several smaller studies"
).split()


def build_context(tokenizer, num_tokens: int, seed: int) -> str:
    """Seeded English-like notes that tokenize to ``num_tokens`` tokens (or one fewer)."""
    rng = random.Random(seed)
    words: list[str] = []
    while len(tokenizer(" ".join(words)).input_ids) < num_tokens:
        sentence = [rng.choice(_WORDS) for _ in range(rng.randint(8, 20))]
        words.extend(sentence[:-1] + [sentence[-1] + "."])
    ids = tokenizer(" ".join(words)).input_ids[:num_tokens]
    return tokenizer.decode(ids, skip_special_tokens=True)


def split_pieces(text: str, count: int) -> list[str]:
    """``count`` consecutive pieces of about equal length (cut anywhere, even mid-word)."""
    step = len(text) / count
    cuts = [round(i * step) for i in range(count + 1)]
    return [text[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]


async def _first_token_after(gen, t0: float) -> tuple[float, list[int]]:
    ttft, tokens = None, []
    async for out in gen:
        if ttft is None and out.outputs[0].token_ids:
            ttft = time.perf_counter() - t0
        tokens += out.outputs[0].token_ids
    return ttft, tokens


async def run_streaming(engine: AsyncEngine, pieces: list[str], interval: float, salt: str,
                        params: SamplingParams) -> dict:
    """Feed pieces as they arrive; reply after the last one. TTFT from the last piece."""
    async with engine.open_stream(cache_salt=salt) as stream:
        start = time.perf_counter()
        for i, piece in enumerate(pieces):
            await asyncio.sleep(max(0.0, start + i * interval - time.perf_counter()))
            if i == len(pieces) - 1:
                t_last = time.perf_counter()
                stream.append(piece + QUESTION)
            else:
                stream.append(piece)
        before = stream.state()
        stream.close_input()
        computed_before = engine.stats().num_computed_tokens
        ttft, tokens = await _first_token_after(stream.generate(params), t_last)
        return {
            "ttft_s": ttft,
            "tokens": tokens,
            "input_tokens": len(stream.prompt_ids()),
            "computed_at_last_piece": before.num_computed_tokens,
            "tokens_computed_after_last_piece": engine.stats().num_computed_tokens - computed_before,
        }


async def run_one_shot(engine: AsyncEngine, pieces: list[str], interval: float, salt: str,
                       params: SamplingParams) -> dict:
    """Wait for every piece (same arrival times), then prefill context + question at once."""
    start = time.perf_counter()
    await asyncio.sleep(max(0.0, start + (len(pieces) - 1) * interval - time.perf_counter()))
    t_last = time.perf_counter()
    salted = dataclasses.replace(params, extra={"cache_salt": salt})
    ttft, tokens = await _first_token_after(engine.generate("".join(pieces) + QUESTION, salted), t_last)
    return {"ttft_s": ttft, "tokens": tokens}


async def ordinary_tpot(engine: AsyncEngine, num: int, prompt_tokens: int, output_tokens: int,
                        seed: int) -> list[float]:
    """Mean seconds per output token after the first, for each of ``num`` concurrent requests."""
    rng = random.Random(seed)
    vocab = len(engine.tokenizer)
    params = SamplingParams(temperature=0, max_tokens=output_tokens, ignore_eos=True)

    async def one() -> float:
        prompt = [rng.randrange(100, vocab - 100) for _ in range(prompt_tokens)]
        times = []
        async for out in engine.generate(prompt, params):
            times.extend(time.perf_counter() for _ in out.outputs[0].token_ids)
        return (times[-1] - times[0]) / (len(times) - 1)

    return list(await asyncio.gather(*(one() for _ in range(num))))


def _stats(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"mean": statistics.fmean(xs), "median": statistics.median(xs),
            "p90": xs[min(len(xs) - 1, int(0.9 * len(xs)))], "all": xs}


async def main_async(args: argparse.Namespace) -> dict:
    options = {"quantization": args.quantization} if args.quantization else {}
    if args.max_num_batched_tokens:
        options["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.tpot_slo_ms:  # the SLO-aware step budget (docs/scheduling.md)
        options["tpot_slo_ms"] = args.tpot_slo_ms
    engine = AsyncEngine(args.model, num_threads=args.threads, max_model_len=8192, **options)
    tok = engine.tokenizer
    context = build_context(tok, args.context_tokens, args.seed)
    pieces = split_pieces(context, args.pieces)
    interval = args.seconds / args.pieces  # the last piece arrives at (pieces - 1) * interval
    params = SamplingParams(temperature=0, max_tokens=args.output_tokens, ignore_eos=True)
    print(f"model {engine.model_name} ({engine.config.quantization} weights, token budget "
          f"{engine.config.max_num_batched_tokens}, TPOT target {engine.config.tpot_slo_ms} ms); context {len(tok(context).input_ids)} tokens in {args.pieces} pieces "
          f"every {interval:.2f}s; question {len(tok(QUESTION, add_special_tokens=False).input_ids)} tokens")

    # Warm-up (kernels, allocator), untimed.
    async for _ in engine.generate(context[: len(context) // 8], SamplingParams(max_tokens=2)):
        pass

    streaming, one_shot = [], []
    for rep in range(args.reps):
        s = await run_streaming(engine, pieces, interval, f"stream-{rep}", params)
        o = await run_one_shot(engine, pieces, interval, f"oneshot-{rep}", params)
        same = s["tokens"] == o["tokens"]
        print(f"rep {rep}: TTFT streaming {s['ttft_s'] * 1e3:.0f} ms (computed {s['tokens_computed_after_last_piece']} "
              f"tokens after the last piece), one-shot {o['ttft_s'] * 1e3:.0f} ms, ratio "
              f"{o['ttft_s'] / s['ttft_s']:.1f}x; same greedy tokens: {same}")
        streaming.append(s)
        one_shot.append(o)
    ttft_s = statistics.median(r["ttft_s"] for r in streaming)
    ttft_o = statistics.median(r["ttft_s"] for r in one_shot)

    alone = await ordinary_tpot(engine, args.concurrent, 128, args.tpot_tokens, args.seed)

    async def with_stream() -> list[float]:
        stream_task = asyncio.ensure_future(run_streaming(engine, pieces, interval, "tpot-stream", params))
        await asyncio.sleep(interval / 2)  # requests start while pieces keep arriving
        tpot = await ordinary_tpot(engine, args.concurrent, 128, args.tpot_tokens, args.seed + 1)
        await stream_task
        return tpot

    before = engine.stats()
    shared = await with_stream()
    after = engine.stats()
    await engine.shutdown()
    # What the TPOT budget did during the shared run (docs/scheduling.md, Metrics).
    slo = {k: getattr(after, k) - getattr(before, k) for k in
           ("num_tpot_slo_misses", "num_slo_capped_steps", "num_slo_floor_steps")}
    a, b = _stats(alone), _stats(shared)
    print(f"\nTTFT after the last piece (median of {args.reps}): streaming {ttft_s * 1e3:.0f} ms, "
          f"one-shot {ttft_o * 1e3:.0f} ms -> {ttft_o / ttft_s:.1f}x lower (target >= 10x)")
    print(f"TPOT of {args.concurrent} concurrent requests ({args.tpot_tokens} tokens): alone mean "
          f"{a['mean'] * 1e3:.1f} ms (p90 {a['p90'] * 1e3:.1f}); with the streaming session "
          f"{b['mean'] * 1e3:.1f} ms (p90 {b['p90'] * 1e3:.1f}) -> {b['mean'] / a['mean']:.2f}x")
    if args.tpot_slo_ms:
        print(f"TPOT budget during the shared run: {slo['num_slo_capped_steps']} steps capped, "
              f"{slo['num_slo_floor_steps']} floor steps, {slo['num_tpot_slo_misses']} decode steps over the target")
    return {
        "ttft_streaming_s": ttft_s, "ttft_one_shot_s": ttft_o, "ttft_ratio": ttft_o / ttft_s,
        "streaming_runs": [{k: v for k, v in r.items() if k != "tokens"} for r in streaming],
        "one_shot_ttfts_s": [r["ttft_s"] for r in one_shot],
        "same_tokens": all(s["tokens"] == o["tokens"] for s, o in zip(streaming, one_shot, strict=True)),
        "tpot_alone_s": a, "tpot_with_stream_s": b, "slo_during_shared_run": slo,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model directory, GGUF file or hub id (default: embedded model)")
    p.add_argument("--context-tokens", type=int, default=4096)
    p.add_argument("--pieces", type=int, default=16)
    p.add_argument("--seconds", type=float, default=8.0, help="arrival spread of the pieces")
    p.add_argument("--output-tokens", type=int, default=16)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--concurrent", type=int, default=8, help="ordinary requests in the TPOT test")
    p.add_argument("--tpot-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quantization", default=None, help="weights format (default: the engine's default)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="token budget per step")
    p.add_argument("--tpot-slo-ms", type=float, default=None,
                   help="the engine's TPOT target: each step's prefill is cut to fit it (default: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-save", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run both arms and the TPOT comparison; print and save the results."""
    args = parse_args(argv)
    info = machine_info(args.threads)
    result = asyncio.run(main_async(args))
    info_end = machine_info(args.threads)
    print(f"load average: start {info['loadavg']}, end {info_end['loadavg']}")
    if not args.no_save:
        append_jsonl(RESULTS, {"time": utc_now(), "commit": git_commit(), "machine": info,
                               "loadavg_end": info_end["loadavg"], "args": vars(args), **result})


if __name__ == "__main__":
    main()
