"""Offline throughput: livelm vs transformers' batched ``generate`` on the same model.

Workloads (all greedy, ``ignore_eos``, random prompt token ids, fixed seed):

- ``a``: 64 requests x 256 prompt tokens x 128 output tokens;
- ``b``: requests with prompt and output lengths drawn uniformly from 100..1024 (the
  nano-vllm shape: 256 requests; capped by ``--num-requests-b``, see its help);
- ``prefill``: 64 requests x 512 prompt tokens x 1 output token (prefill-heavy, for MFU).

Both engines run in this process on the same weights, after warm-up runs that are not
timed. The script also measures the machine's fp32 matmul GFLOP/s on the model's own
GEMM shapes and reports livelm's achieved model FLOP/s as a fraction of it. Results are
printed as a table and appended as JSON lines to ``benchmarks/results/offline_throughput.jsonl``.

Usage::

    python benchmarks/offline_throughput.py MODEL_DIR
    python benchmarks/offline_throughput.py --random-smollm2-shape /tmp/smollm2-random
    python benchmarks/offline_throughput.py --random-smollm2-shape /tmp/smollm2-random --quick
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    FLOP_FORMULA,
    ModelShape,
    append_jsonl,
    measure_matmul_gflops,
    model_flops,
    utc_now,
)

from livelm.bench.hf_baseline import RunResult, build_hf, run_hf  # noqa: E402
from livelm.bench.machine import git_commit, machine_info  # noqa: E402
from livelm.bench.random_model import NUM_SPECIAL_TOKENS, build_random_smollm2_shape  # noqa: E402

RESULTS_FILE = Path(__file__).resolve().parent / "results" / "offline_throughput.jsonl"
# About 15 minutes for the whole script on 2 quiet cores of an AVX-512 EPYC (SmolLM2 shape),
# estimated from quiet-window timings of its parts; the full 256 would take hours there.
DEFAULT_NUM_REQUESTS_B = 32
FULL_NUM_REQUESTS_B = 256


@dataclass
class Workload:
    """Prompts (token ids) and the number of output tokens each request must produce."""

    name: str
    description: str
    prompts: list[list[int]]
    output_lens: list[int]
    hf_batch_sizes: list[int]
    notes: list[str] = field(default_factory=list)

    @property
    def prompt_lens(self) -> list[int]:
        """Prompt length of each request."""
        return [len(p) for p in self.prompts]


# ----------------------------------------------------------------------------- workloads


def _random_prompt(rng: random.Random, length: int, vocab: int) -> list[int]:
    # Special-token ids are left out: a real prompt rarely contains them.
    return [rng.randrange(NUM_SPECIAL_TOKENS, vocab) for _ in range(length)]


def make_workloads(args: argparse.Namespace, vocab: int) -> list[Workload]:
    """The requested workloads, seeded by ``--seed``."""
    rng = random.Random(args.seed)
    q = args.quick
    wanted = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = set(wanted) - {"a", "b", "prefill"}
    if unknown:
        raise SystemExit(f"unknown workload(s) {sorted(unknown)}: choose from a, b, prefill")
    out: list[Workload] = []
    for name in wanted:
        if name == "a":
            n, p, o = (4, 16, 4) if q else (64, 256, 128)
            out.append(
                Workload(
                    "a",
                    f"{n} req x {p} prompt x {o} out",
                    [_random_prompt(rng, p, vocab) for _ in range(n)],
                    [o] * n,
                    [n],
                )
            )
        elif name == "b":
            lo, hi = (8, 24) if q else (100, 1024)
            n = (
                args.num_requests_b
                if args.num_requests_b is not None
                else (4 if q else DEFAULT_NUM_REQUESTS_B)
            )
            # Draw all 256 so that a capped run is a prefix of the full one.
            lens = [
                (rng.randint(lo, hi), rng.randint(lo, hi))
                for _ in range(max(n, FULL_NUM_REQUESTS_B))
            ][:n]
            prompts = [_random_prompt(rng, p, vocab) for p, _ in lens]
            notes = []
            if n < FULL_NUM_REQUESTS_B and not q:
                notes.append(
                    f"workload b CAPPED at {n} of {FULL_NUM_REQUESTS_B} requests "
                    f"(--num-requests-b {FULL_NUM_REQUESTS_B} for the full nano-vllm shape)"
                )
            sizes = (
                [int(s) for s in args.hf_batch_sizes_b.split(",")]
                if args.hf_batch_sizes_b
                else [min(16, n)]
            )
            out.append(
                Workload(
                    "b",
                    f"{n} req x U[{lo},{hi}] prompt x U[{lo},{hi}] out",
                    prompts,
                    [o for _, o in lens],
                    sorted({min(s, n) for s in sizes}),
                    notes,
                )
            )
        else:
            n, p = (4, 64) if q else (64, 512)
            out.append(
                Workload(
                    "prefill",
                    f"{n} req x {p} prompt x 1 out",
                    [_random_prompt(rng, p, vocab) for _ in range(n)],
                    [1] * n,
                    [n],
                )
            )
    return out


# ----------------------------------------------------------------------------- engines


def build_livelm(model_dir: Path, args: argparse.Namespace):
    """The livelm engine under test."""
    from livelm import LLM

    return LLM(
        str(model_dir),
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        kv_cache_gib=args.kv_cache_gib,
        num_threads=args.threads,
    )


def run_livelm(llm, prompts: list[list[int]], output_lens: list[int]) -> RunResult:
    """Time one ``llm.generate`` over all requests (greedy, ignore_eos)."""
    from livelm import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True) for o in output_lens]
    preempt_before = llm.engine.stats().num_preemptions
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    ids = [list(o.outputs[0].token_ids) for o in outputs]
    for got, want in zip(ids, output_lens, strict=True):
        if len(got) != want:
            raise RuntimeError(
                f"livelm returned {len(got)} tokens where {want} were asked (ignore_eos)"
            )
    return RunResult(
        seconds,
        ids,
        sum(output_lens),
        {"preemptions": llm.engine.stats().num_preemptions - preempt_before},
    )


def agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, float]:
    """How alike two engines' greedy outputs are: identical requests, and the mean share
    of each output before the first differing token.

    Informational only: a random-weight model has near-tied logits, so tiny fp32
    differences between batch shapes can flip an argmax.
    """
    same = sum(x == y for x, y in zip(a, b, strict=True))
    prefix = []
    for x, y in zip(a, b, strict=True):
        k = next(
            (i for i, (s, t) in enumerate(zip(x, y, strict=False)) if s != t), min(len(x), len(y))
        )
        prefix.append(k / max(len(x), 1))
    return {"identical_requests": same / len(a), "mean_common_prefix": sum(prefix) / len(prefix)}


# ----------------------------------------------------------------------------- profile


def profile_livelm(llm, vocab: int, args: argparse.Namespace) -> None:
    """Where livelm spends workload (a)'s time, at reduced size: torch ops by self CPU
    time, then Python functions by own time (scheduler, detokenizer, batch building)."""
    from torch.profiler import ProfilerActivity, profile

    rng = random.Random(args.seed + 1)
    n, p, o = (4, 32, 4) if args.quick else (args.profile_requests, 256, args.profile_output_tokens)
    prompts = [_random_prompt(rng, p, vocab) for _ in range(n)]
    print(f"\n== profile: livelm, {n} req x {p} prompt x {o} out (workload a shape, reduced) ==")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        res = run_livelm(llm, prompts, [o] * n)
    ops_self = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e6
    print(f"wall {res.seconds:.2f}s (profiler on); torch ops self CPU total {ops_self:.2f}s")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    # Fresh prompts: the first run's would be served from the prefix cache.
    prompts = [_random_prompt(rng, p, vocab) for _ in range(n)]
    pr = cProfile.Profile()
    pr.enable()
    res = run_livelm(llm, prompts, [o] * n)
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(25)
    print(f"== cProfile (wall {res.seconds:.2f}s with cProfile on), top 25 by own time ==")
    print(buf.getvalue())


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("model_dir", nargs="?", type=Path, help="a Hugging Face model directory")
    src.add_argument(
        "--random-smollm2-shape",
        type=Path,
        metavar="DIR",
        help="build (once, cached in DIR) and use a random-weight Llama of SmolLM2-135M's shape",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument(
        "--workloads", default="a,b,prefill", help="comma list of a, b, prefill (default all)"
    )
    ap.add_argument("--skip-transformers", action="store_true", help="run livelm only")
    ap.add_argument(
        "--max-num-batched-tokens", type=int, default=2048, help="livelm token budget per step"
    )
    ap.add_argument("--max-num-seqs", type=int, default=256, help="livelm max concurrent requests")
    ap.add_argument("--kv-cache-gib", type=float, default=4.0, help="livelm KV cache size (GiB)")
    ap.add_argument(
        "--num-requests-b",
        type=int,
        default=None,
        help=f"requests in workload b (default {DEFAULT_NUM_REQUESTS_B}, so that the whole script\n"
        f"takes ~15 min on 2 cores; the full nano-vllm shape is {FULL_NUM_REQUESTS_B})",
    )
    ap.add_argument(
        "--hf-batch-sizes-b",
        default=None,
        help="comma list of transformers batch sizes to try on workload b; the best counts\n(default 16)",
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the random prompts and lengths")
    ap.add_argument(
        "--quick", action="store_true", help="tiny sizes: a smoke test in under a minute"
    )
    ap.add_argument(
        "--profile", action="store_true", help="also profile livelm on workload a (reduced)"
    )
    ap.add_argument("--profile-requests", type=int, default=16, help="requests in the profiled run")
    ap.add_argument(
        "--profile-output-tokens", type=int, default=32, help="output tokens in the profiled run"
    )
    ap.add_argument(
        "--results", type=Path, default=RESULTS_FILE, help="JSON-lines file to append to"
    )
    ap.add_argument("--no-save", action="store_true", help="do not append to the results file")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print/save its results."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if args.random_smollm2_shape is not None:
        t0 = time.perf_counter()
        model_dir = build_random_smollm2_shape(args.random_smollm2_shape)
        model_label = "random-smollm2-135m-shape"
        print(
            f"model: random SmolLM2-135M-shaped Llama in {model_dir} ({time.perf_counter() - t0:.1f}s)"
        )
    else:
        model_dir = args.model_dir
        model_label = model_dir.name
        print(f"model: {model_dir}")
    shape = ModelShape.from_dir(model_dir)
    machine = machine_info(args.threads)
    print(
        f"machine: {machine['cores']} cores ({machine['cpu']}), torch threads {args.threads}, "
        f"torch {machine['torch']}, transformers {machine['transformers']}, "
        f"load average {' '.join(f'{x:.2f}' for x in machine['loadavg'] or [])}"
    )
    workloads = make_workloads(args, shape.vocab)
    for wl in workloads:
        for note in wl.notes:
            print(f"NOTE: {note}")

    rows = 512 if args.quick else args.max_num_batched_tokens
    roof = measure_matmul_gflops(shape, rows=rows, repeats=2 if args.quick else 5)
    print(
        f"fp32 matmul roofline ({rows} rows x model GEMM shapes, best of runs and of MKL/oneDNN/panel): "
        f"peak {roof['peak']:.1f} GFLOP/s, one-layer mix {roof['model_mix']:.1f} GFLOP/s "
        f"(MKL F.linear peak {roof['mkl_peak']:.1f}, oneDNN packed peak {roof.get('onednn_peak', 0):.1f}, "
        f"livelm panel GEMM peak {roof.get('panel_peak', 0):.1f})"
    )
    print(f"  {FLOP_FORMULA}")
    print(f"  N_nonemb = {shape.non_embedding_params:,}, hidden * vocab = {shape.lm_head_params:,}")

    llm = build_livelm(model_dir, args)
    hf = None if args.skip_transformers else build_hf(model_dir)
    # Warm-up (untimed): allocator, kernel selection, lazy tables, first-call paths.
    rng = random.Random(12345)
    warm_lens = (8, 16) if args.quick else (48, 80, 112, 144)
    warm_prompts = [_random_prompt(rng, n, shape.vocab) for n in warm_lens]
    warm_out = [2 if args.quick else 8] * len(warm_prompts)
    run_livelm(llm, warm_prompts, warm_out)
    if hf is not None:
        run_hf(hf, warm_prompts, warm_out, len(warm_prompts))

    records = []
    for wl in workloads:
        load = os.getloadavg()
        print(f"\n-- workload {wl.name}: {wl.description} (load average {load[0]:.2f})")
        flops = model_flops(shape, wl.prompt_lens, wl.output_lens)
        lv = run_livelm(llm, wl.prompts, wl.output_lens)
        lv_gflops = flops["dense_flops"] / lv.seconds / 1e9
        print(
            f"   livelm: {lv.seconds:.1f}s, {lv.useful_output_tokens / lv.seconds:.1f} out tok/s, "
            f"{(sum(wl.prompt_lens) + lv.useful_output_tokens) / lv.seconds:.1f} total tok/s, "
            f"{lv_gflops:.1f} model GFLOP/s, preemptions {lv.extra['preemptions']}"
        )
        hf_best: RunResult | None = None
        hf_runs = []
        if hf is not None:
            for bs in wl.hf_batch_sizes:
                r = run_hf(hf, wl.prompts, wl.output_lens, bs)
                hf_runs.append({"batch_size": bs, "seconds": r.seconds, **r.extra})
                print(
                    f"   transformers (batch {bs}): {r.seconds:.1f}s, "
                    f"{r.useful_output_tokens / r.seconds:.1f} useful out tok/s "
                    f"(generated {r.extra['generated_tokens']} for {r.useful_output_tokens} useful)"
                )
                if hf_best is None or r.seconds < hf_best.seconds:
                    hf_best = r
        rec = {
            "date": utc_now(),
            "git_commit": git_commit(),
            "machine": machine,
            "model": model_label,
            "model_dir": str(model_dir),
            "workload": wl.name,
            "description": wl.description,
            "loadavg_before": list(load),
            "num_requests": len(wl.prompts),
            "prompt_tokens": sum(wl.prompt_lens),
            "output_tokens": sum(wl.output_lens),
            "quick": args.quick,
            "notes": wl.notes,
            "livelm_config": {
                "max_num_batched_tokens": args.max_num_batched_tokens,
                "max_num_seqs": args.max_num_seqs,
                "kv_cache_gib": args.kv_cache_gib,
            },
            "livelm": {
                "seconds": lv.seconds,
                "output_tok_s": lv.useful_output_tokens / lv.seconds,
                "prompt_tok_s": sum(wl.prompt_lens) / lv.seconds,
                "model_gflop_s": lv_gflops,
                "model_gflop_s_with_attn": (flops["dense_flops"] + flops["attn_flops"])
                / lv.seconds
                / 1e9,
                **lv.extra,
            },
            "flops": {**flops, "formula": FLOP_FORMULA, "n_nonemb": shape.non_embedding_params},
            "roofline_gflop_s": roof,
        }
        if hf_best is not None:
            rec["transformers"] = {
                "seconds": hf_best.seconds,
                "output_tok_s": hf_best.useful_output_tokens / hf_best.seconds,
                "prompt_tok_s": sum(wl.prompt_lens) / hf_best.seconds,
                **hf_best.extra,
                "runs": hf_runs,
            }
            rec["ratio"] = hf_best.seconds / lv.seconds
            rec["agreement"] = agreement(lv.output_token_ids, hf_best.output_token_ids)
            print(
                f"   greedy agreement livelm vs transformers (informational): "
                f"{rec['agreement']['identical_requests']:.0%} requests identical, "
                f"mean common prefix {rec['agreement']['mean_common_prefix']:.0%}"
            )
        records.append(rec)

    if args.profile:
        profile_livelm(llm, shape.vocab, args)

    roof_end = measure_matmul_gflops(shape, rows=rows, repeats=2 if args.quick else 5)
    print(
        f"\nroofline re-measured at the end: peak {roof_end['peak']:.1f} GFLOP/s (start {roof['peak']:.1f})"
    )
    end_load = machine_info(args.threads)["loadavg"]
    # Other processes can only slow a measurement down: the faster one is the machine's.
    peak = max(roof["peak"], roof_end["peak"])
    for rec in records:
        rec["roofline_end_gflop_s"] = roof_end
        rec["roofline_peak_gflop_s"] = peak
        rec["loadavg_end"] = end_load
        rec["mfu"] = rec["livelm"]["model_gflop_s"] / peak

    print_table(records)
    print(f"MFU = livelm model GFLOP/s / matmul peak ({peak:.1f} GFLOP/s, best of start and end)")
    print(f"  {FLOP_FORMULA}")
    print(
        "prefill row: tok/s are PROMPT tokens/s (1 output token per request); other rows: output tok/s."
    )
    for wl in workloads:
        for note in wl.notes:
            print(f"NOTE: {note}")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in end_load or [])}")
    print(f"total time {time.perf_counter() - started:.0f}s")
    if not args.no_save:
        for rec in records:
            append_jsonl(args.results, rec)
        print(f"appended {len(records)} record(s) to {args.results}")


def print_table(records: list[dict]) -> None:
    """The summary table."""
    header = f"{'workload':<42} {'livelm tok/s':>13} {'HF tok/s':>10} {'ratio':>7} {'GFLOP/s':>8} {'MFU':>6}"
    print("\n" + header)
    print("-" * len(header))
    for rec in records:
        key = "prompt_tok_s" if rec["workload"] == "prefill" else "output_tok_s"
        hf = rec.get("transformers")
        hf_s = f"{hf[key]:.1f}" if hf else "-"
        ratio = f"{rec['ratio']:.2f}x" if "ratio" in rec else "-"
        name = f"{rec['workload']}: {rec['description']}"
        print(
            f"{name:<42} {rec['livelm'][key]:>13.1f} {hf_s:>10} {ratio:>7} "
            f"{rec['livelm']['model_gflop_s']:>8.1f} {rec['mfu']:>6.1%}"
        )


if __name__ == "__main__":
    main()
