"""KV cache dtypes: what a bfloat16, q8_0, float16 or fp8 cache gains over float32, and
what it costs in accuracy, on the default model (SmolLM2-135M-Instruct, its Q4_1 weights)
in one run.

For each ``kv_cache_dtype`` (float32, bfloat16, q8_0, float16, fp8; ``--dtypes`` picks),
one engine each, arms taking turns for ``--rounds`` rounds (best round counts):

- batch: 64 random prompts x 256 tokens, 128 greedy output tokens each (``ignore_eos``),
  one ``LLM.generate`` call: output tokens per second, end to end (prefill included);
- single stream: one 256-token prompt, 128 output tokens: decode tokens per second
  ((tokens - 1) / (last token - first token));
- perplexity: the teacher-forced perplexity of a text of at least 4,096 tokens (the
  project's own README and docs, concatenated), from ``prompt_logprobs`` of one request
  prefilled in 2,048-token chunks, so every chunk after the first reads the earlier
  chunks' K/V from the cache in that dtype.

Printed: the attention path of each arm (the C++ kernels read float32, bfloat16 and q8_0
in place; float16 and fp8 take the torch path), the KV bytes per token, the ratios to float32, the CPU, threads, the memory
bandwidth and the load average at start and end. One JSON line goes to
``benchmarks/results/kv_cache_dtype.jsonl``.

Usage::

    python benchmarks/kv_cache_dtype.py            # 2 rounds
    python benchmarks/kv_cache_dtype.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO_ROOT, append_jsonl, utc_now  # noqa: E402
from decode import livelm_batch, livelm_single, measure_bandwidth, random_prompt  # noqa: E402

from livelm import LLM, SamplingParams  # noqa: E402
from livelm.bench.machine import git_commit, machine_info  # noqa: E402

RESULTS_FILE = Path(__file__).resolve().parent / "results" / "kv_cache_dtype.jsonl"
DTYPES = ("float32", "bfloat16", "q8_0", "float16", "fp8")


def perplexity_text() -> str:
    """The README and every page of docs/, concatenated (plain English and code)."""
    parts = [(REPO_ROOT / "README.md").read_text()]
    parts += [p.read_text() for p in sorted((REPO_ROOT / "docs").glob("*.md"))]
    return "\n\n".join(parts)


def perplexity(llm: LLM, ids: list[int]) -> float:
    """exp(mean negative log-likelihood) of ids[1:] given what precedes each."""
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    out = llm.generate([ids], params, use_tqdm=False)[0]
    nll = [-out.prompt_logprobs[i][tok].logprob for i, tok in enumerate(ids) if i > 0]
    return math.exp(sum(nll) / len(nll))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="8 x 64 x 16 batch, 32-token stream, 1 round")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated arms (float32 always runs)")
    args = ap.parse_args()
    dtypes = ("float32", *(d for d in args.dtypes.split(",") if d and d != "float32"))
    n_req, prompt_len, out_len, stream_out = (8, 64, 16, 32) if args.quick else (64, 256, 128, 128)
    rounds = 1 if args.quick else args.rounds
    torch.set_num_threads(args.threads)

    info = machine_info(args.threads)
    bw = measure_bandwidth()
    print(f"KV cache dtype benchmark, {utc_now()}, commit {(git_commit() or '?')[:7]}, {args.threads} threads, "
          f"load {info['loadavg'][0]:.2f}")
    print(f"CPU: {info['cpu']} ({info['cores']} cores)")
    print(f"memory bandwidth: read {bw['read_gb_s']:.1f} GB/s, copy {bw['copy_gb_s']:.1f} GB/s\n")

    engines = {d: LLM(None, kv_cache_dtype=d, num_threads=args.threads, max_model_len=8192,
                      max_num_seqs=max(64, n_req), kv_cache_gib=4.0) for d in dtypes}
    vocab = engines["float32"].engine.model_config.vocab_size
    rng = random.Random(0)
    prompts = [random_prompt(rng, prompt_len, vocab) for _ in range(n_req)]
    stream_prompt = random_prompt(rng, prompt_len, vocab)
    text_ids = engines["float32"].engine.prompt_ids(perplexity_text())
    text_ids = text_ids[: 6144] if not args.quick else text_ids[:1024]
    if not args.quick:
        assert len(text_ids) >= 4096, len(text_ids)
    for llm in engines.values():  # warm-up: kernels loaded, first-step costs paid
        livelm_batch(llm, prompts[:2], 4)

    batch = {d: [] for d in dtypes}
    single = {d: [] for d in dtypes}
    tokens: dict[str, list[int]] = {}
    for r in range(rounds):
        for d in dtypes if r % 2 == 0 else reversed(dtypes):
            seconds = livelm_batch(engines[d], prompts, out_len)
            batch[d].append(n_req * out_len / seconds)
            _, decode, toks = livelm_single(engines[d], stream_prompt, stream_out)
            single[d].append(decode)
            tokens[d] = toks
            print(f"  round {r + 1} {d}: batch {batch[d][-1]:.1f} out tok/s, single {decode:.1f} tok/s", flush=True)
    ppl = {d: perplexity(engines[d], text_ids) for d in dtypes}

    print(f"\n{n_req} x {prompt_len} x {out_len} batch and a {prompt_len}-token single stream, best of {rounds}; "
          f"perplexity over {len(text_ids)} tokens:")
    base_b, base_s = max(batch["float32"]), max(single["float32"])
    record_arms = {}
    for d in dtypes:
        path = engines[d].engine.runner.attn_backend.name
        b, s = max(batch[d]), max(single[d])
        same = sum(a == c for a, c in zip(tokens[d], tokens["float32"], strict=True))
        per_token = engines[d].engine.kv_block_bytes / engines[d].engine.cache_config.block_size
        print(f"  {d:9s} ({path} attention, {per_token / 1024:.1f} KiB KV per token): batch {b:7.1f} out tok/s ({b / base_b:.2f}x), single {s:6.1f} tok/s "
              f"({s / base_s:.2f}x), perplexity {ppl[d]:.4f} ({100 * (ppl[d] / ppl['float32'] - 1):+.3f}%), "
              f"stream tokens equal to float32's: {same}/{len(tokens[d])}")
        record_arms[d] = {"attention": path, "batch_out_tok_s": batch[d], "single_tok_s": single[d],
                          "perplexity": ppl[d], "tokens_equal_fp32": same,
                          "kv_block_bytes": engines[d].engine.kv_block_bytes}
    load_end = os.getloadavg()[0]
    print(f"\nload average: {info['loadavg'][0]:.2f} at start, {load_end:.2f} at end")
    append_jsonl(RESULTS_FILE, {"date": utc_now(), "commit": git_commit(), "machine": info, "bandwidth": bw,
                                "quick": args.quick, "shape": [n_req, prompt_len, out_len, stream_out],
                                "perplexity_tokens": len(text_ids), "arms": record_arms, "load_end": load_end,
                                "time": time.time()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
