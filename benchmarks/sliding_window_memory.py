"""KV memory a 32k-token request holds on a Mistral-shaped model, with and without its
sliding window (issue 16).

A random Mistral model with Mistral-7B's attention shape per layer (8 KV heads of 128,
sliding window 4,096) but 2 layers and a small MLP (so 32k tokens prefill in minutes on
2 cores) runs one request of ``--tokens`` prompt tokens and a few output tokens, twice:
with ``sliding_window=4096`` and with the window removed from its config. The engine is
stepped by hand and the KV blocks in use are read after every step; the peak is reported, in blocks and in bytes, and scaled to Mistral-7B's 32
layers (bytes per block x 16: the KV bytes of a block are linear in the layer count).

Usage::

    python benchmarks/sliding_window_memory.py [--tokens 32768] [--window 4096]

Results go to stdout and one JSON line to ``benchmarks/results/sliding_window_memory.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO_ROOT, append_jsonl, utc_now  # noqa: E402

from livelm.bench.machine import git_commit  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results" / "sliding_window_memory.jsonl"
MISTRAL_7B_LAYERS = 32


def build_model(out: Path, window: int | None, max_positions: int) -> Path:
    """A random MistralForCausalLM: Mistral-7B's KV shape per layer, 2 layers."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from livelm.bench.random_model import build_full_vocab_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    vocab = 4096
    build_full_vocab_tokenizer(out, vocab)
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=vocab, hidden_size=1024, intermediate_size=512, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=8, head_dim=128,
                        max_position_embeddings=max_positions, sliding_window=window, rope_theta=1e6,
                        bos_token_id=0, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    MistralForCausalLM(cfg).to(torch.float32).save_pretrained(out, safe_serialization=True)
    return out


def run(model_dir: Path, tokens: int, threads: int) -> dict:
    """Peak and final KV blocks of one request of ``tokens`` prompt tokens + 8 output."""
    from livelm.engine.llm import LLM
    from livelm.sampling_params import SamplingParams

    llm = LLM(str(model_dir), num_threads=threads, max_model_len=tokens + 16, max_num_batched_tokens=2048,
              kv_cache_gib=0.75)
    engine = llm.engine
    rng = random.Random(0)
    engine.add("long", [rng.randrange(3, 4000) for _ in range(tokens)],
               SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    total = engine.stats().num_total_blocks
    peak, t0, steps = 0, time.perf_counter(), 0
    while engine.scheduler.has_unfinished():
        engine.step()
        steps += 1
        used = total - engine.stats().num_free_blocks
        peak = max(peak, used)
    seconds = time.perf_counter() - t0
    block_bytes = engine.kv_block_bytes
    return {"peak_blocks": peak, "block_bytes": block_bytes,
            "peak_bytes": peak * block_bytes, "peak_bytes_mistral_7b": peak * block_bytes * MISTRAL_7B_LAYERS // 2,
            "seconds": seconds, "steps": steps, "block_size": engine.config.block_size}


def main(argv: list[str] | None = None) -> None:
    """Both arms, printed and appended as one JSON line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    record = {"benchmark": "sliding_window_memory", "time": utc_now(), "commit": git_commit(),
              "tokens": args.tokens, "window": args.window, "loadavg_start": list(os.getloadavg())}
    with tempfile.TemporaryDirectory() as tmp:
        for name, window in (("window", args.window), ("no_window", None)):
            model = build_model(Path(tmp) / name, window, args.tokens + 16)
            r = record[name] = run(model, args.tokens, args.threads)
            print(f"{name}: peak {r['peak_blocks']} blocks of {r['block_size']} tokens = "
                  f"{r['peak_bytes'] / 2**20:.1f} MiB (2 layers; {r['peak_bytes_mistral_7b'] / 2**30:.2f} GiB at "
                  f"Mistral-7B's 32 layers, fp32), {r['seconds']:.0f} s", flush=True)
    record["ratio_no_window_over_window"] = record["no_window"]["peak_blocks"] / record["window"]["peak_blocks"]
    record["loadavg_end"] = list(os.getloadavg())
    print(f"without the window the request holds {record['ratio_no_window_over_window']:.1f}x the KV")
    print(json.dumps(record))
    append_jsonl(RESULTS, record)


if __name__ == "__main__":
    main()
