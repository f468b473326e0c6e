"""Structured output: what a JSON-schema constraint costs per output token, and compile time.

On the default model (SmolLM2-135M-Instruct, the embedded Q4_1 GGUF) or ``--model``, in
one process and one run:

- decode: 16 concurrent requests (16 chat prompts asking for JSON, one ``LLM.generate``
  call), each generating exactly ``--tokens`` tokens, once constrained by a JSON schema
  (an object holding a list of at least 40 records of 6 fields: it cannot close within
  the token budget, so every request runs to ``max_tokens`` and the batch stays 16 wide
  throughout) and once unconstrained (``ignore_eos``). Both arms use the same prompts
  and sampling settings, greedy and then temperature 0.8 with seeds. Time per output
  token (TPOT) of each request is (last token - first token) / (tokens - 1), from its
  ``RequestOutput.metrics``; the arms take turns for ``--rounds`` rounds and the best
  round's mean TPOT counts. Reported: both TPOTs and the overhead of the constraint
  (target <= 10%), with the grammar worker's time per step (filling the bitmask, in a
  thread, while the model runs) and how long sampling waited for it.
- compile: a 20-field schema compiled for the engine's tokenizer: llguidance's
  tokenizer set-up (once per engine), the first compile, and a cached one.

Also printed: the CPU model, torch threads, the memory bandwidth (read and copy) and the
load average at start and end (timings on a busy machine are not comparable). One JSON
line goes to ``benchmarks/results/structured_output.jsonl``.

Usage::

    python benchmarks/structured_output.py               # default model
    python benchmarks/structured_output.py --quick       # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_jsonl, utc_now  # noqa: E402
from decode import measure_bandwidth  # noqa: E402

from livelm.bench.machine import git_commit, machine_info  # noqa: E402

RESULTS_FILE = Path(__file__).resolve().parent / "results" / "structured_output.jsonl"
REQUESTS = 16

RECORDS_SCHEMA = {
    "type": "object",
    "properties": {
        "people": {
            "type": "array",
            "minItems": 40,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 40},
                    "age": {"type": "integer", "minimum": 0, "maximum": 130},
                    "email": {"type": "string", "pattern": "^[a-z0-9.]+@[a-z]+\\.[a-z]{2,3}$"},
                    "city": {"type": "string", "maxLength": 40},
                    "role": {"enum": ["engineer", "designer", "manager", "analyst", "other"]},
                    "active": {"type": "boolean"},
                },
                "required": ["name", "age", "email", "city", "role", "active"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["people"],
    "additionalProperties": False,
}


def twenty_field_schema(salt: str = "") -> dict:
    """An object of 20 required fields of mixed types (strings, numbers, enums, arrays,
    a nested object, a pattern); ``salt`` renames the fields, making a distinct schema."""
    kinds = [
        {"type": "string", "maxLength": 64},
        {"type": "integer", "minimum": 0},
        {"type": "number"},
        {"type": "boolean"},
        {"enum": ["low", "medium", "high"]},
        {"type": "array", "items": {"type": "string"}, "maxItems": 8},
        {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
         "required": ["x", "y"], "additionalProperties": False},
        {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        {"type": "string", "format": "date"},
        {"anyOf": [{"type": "string"}, {"type": "null"}]},
    ]
    props = {f"field_{salt}{i}": kinds[i % len(kinds)] for i in range(20)}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def prompts(llm) -> list[list[int]]:
    """One chat prompt per request, each asking for a different list as JSON."""
    topics = ["engineers in Paris", "designers in Tokyo", "managers in Lima", "analysts in Oslo"]
    return [
        llm.engine.chat_ids([{
            "role": "user",
            "content": f"List 40 {topics[i % len(topics)]} (group {i}) as JSON with name, age, email, "
                       "city, role and active for each.",
        }])
        for i in range(REQUESTS)
    ]


def mean_tpot(outs, tokens: int) -> float:
    """Mean time per output token over the requests, in seconds."""
    per = []
    for o in outs:
        assert len(o.outputs[0].token_ids) == tokens, (len(o.outputs[0].token_ids), o.outputs[0].finish_reason)
        m = o.metrics
        per.append((m["last_token_time"] - m["first_token_time"]) / (tokens - 1))
    return statistics.mean(per)


def run_arm(llm, ps: list[list[int]], tokens: int, temperature: float, constrained: bool) -> float:
    from livelm import SamplingParams, StructuredOutput

    params = [
        SamplingParams(
            temperature=temperature,
            seed=None if temperature == 0 else 100 + i,
            max_tokens=tokens,
            ignore_eos=not constrained,
            structured=StructuredOutput(json=RECORDS_SCHEMA) if constrained else None,
        )
        for i in range(len(ps))
    ]
    outs = llm.generate(ps, params, use_tqdm=False)
    if constrained:  # the text so far must be a prefix the schema allows: spot-check one
        assert outs[0].outputs[0].text.startswith('{"people": [{"name": "'), outs[0].outputs[0].text[:80]
        assert all(o.outputs[0].finish_reason == "length" for o in outs)
    return mean_tpot(outs, tokens)


def compile_times(llm) -> dict:
    from livelm import StructuredOutput
    from livelm.runner.structured import GrammarBackend

    engine = llm.engine
    fresh = GrammarBackend(engine.tokenizer, engine.model_config.vocab_size, engine.eos_token_ids)
    t0 = time.perf_counter()
    fresh.ll_tokenizer  # noqa: B018 - builds llguidance's view of the vocabulary
    tokenizer_s = time.perf_counter() - t0
    firsts, cached = [], []
    for k in range(5):
        s = StructuredOutput(json=twenty_field_schema(f"r{k}_"))
        t0 = time.perf_counter()
        fresh.compile(s)
        firsts.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(100):
            fresh.compile(s)
        cached.append((time.perf_counter() - t0) / 100)
    return {
        "tokenizer_setup_s": tokenizer_s,
        "first_compile_ms_median": statistics.median(firsts) * 1e3,
        "first_compile_ms_all": [f * 1e3 for f in firsts],
        "cached_compile_us_median": statistics.median(cached) * 1e6,
        "schema_chars": len(json.dumps(twenty_field_schema("r0_"))),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a GGUF file or HF directory (default: the embedded model)")
    ap.add_argument("--tokens", type=int, default=128, help="output tokens per request")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--quick", action="store_true", help="32 tokens, 1 round")
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.rounds = 32, 1
    torch.set_num_threads(args.threads)
    from livelm import LLM

    started = utc_now()
    machine = machine_info(args.threads)
    load_start = os.getloadavg()[0]
    print(f"structured output benchmark, {started}, commit {(git_commit() or '?')[:7]}, "
          f"{args.threads} threads, load {load_start:.2f}", flush=True)
    print(f"CPU: {machine['cpu']} ({machine['cores']} cores)", flush=True)
    bandwidth = measure_bandwidth()
    print(f"memory bandwidth: read {bandwidth['read_gb_s']:.1f} GB/s, copy {bandwidth['copy_gb_s']:.1f} GB/s",
          flush=True)

    llm = LLM(args.model, num_threads=args.threads)
    compile_rec = compile_times(llm)
    print(f"\ncompile, 20-field schema ({compile_rec['schema_chars']} chars): llguidance tokenizer set-up "
          f"{compile_rec['tokenizer_setup_s']:.2f} s (once per engine); first compile "
          f"{compile_rec['first_compile_ms_median']:.1f} ms (median of 5 schemas); cached "
          f"{compile_rec['cached_compile_us_median']:.1f} us", flush=True)

    ps = prompts(llm)
    run_arm(llm, ps, 8, 0.0, True)  # warm-up: kernels, the schema's grammar, the worker thread
    run_arm(llm, ps, 8, 0.0, False)
    stats = llm.engine.runner.structured.stats
    results = {}
    for temperature in (0.0, 0.8):
        best = {"constrained": float("inf"), "free": float("inf")}
        fill_before = (stats.steps, stats.rows, stats.fill_s, stats.wait_s)
        for _ in range(args.rounds):
            for arm in ("free", "constrained"):
                best[arm] = min(best[arm], run_arm(llm, ps, args.tokens, temperature, arm == "constrained"))
        steps = stats.steps - fill_before[0]
        fill_ms = (stats.fill_s - fill_before[2]) / max(steps, 1) * 1e3
        wait_ms = (stats.wait_s - fill_before[3]) / max(steps, 1) * 1e3
        overhead = best["constrained"] / best["free"] - 1
        results[f"temperature_{temperature:g}"] = {
            "tpot_free_ms": best["free"] * 1e3,
            "tpot_constrained_ms": best["constrained"] * 1e3,
            "overhead": overhead,
            "fill_ms_per_step": fill_ms,
            "wait_ms_per_step": wait_ms,
        }
        print(f"\ntemperature {temperature:g}, {REQUESTS} requests x {args.tokens} tokens, best of {args.rounds}:\n"
              f"  TPOT unconstrained {best['free'] * 1e3:.2f} ms, JSON schema {best['constrained'] * 1e3:.2f} ms: "
              f"overhead {overhead * 100:+.1f}% (target <= 10%)\n"
              f"  grammar worker: {fill_ms:.2f} ms per step for {REQUESTS} rows (in a thread, beside the "
              f"model); sampling waited {wait_ms:.2f} ms per step", flush=True)

    load_end = os.getloadavg()[0]
    print(f"\nload average: {load_start:.2f} at start, {load_end:.2f} at end")
    append_jsonl(RESULTS_FILE, {
        "date": started, "commit": git_commit(), "machine": machine, "bandwidth": bandwidth,
        "load_start": load_start, "load_end": load_end, "model": args.model or "default",
        "tokens": args.tokens, "rounds": args.rounds, "requests": REQUESTS,
        "decode": results, "compile": compile_rec,
    })


if __name__ == "__main__":
    main()
