"""Shared benchmark helpers: FLOP counts, a matmul roofline and JSON-lines result records.

The random SmolLM2-shaped model, machine facts and the commit come from the installed
package (:mod:`livelm.bench.random_model`, :mod:`livelm.bench.machine`), which
``livelm bench`` uses too.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- FLOPs


@dataclass(frozen=True)
class ModelShape:
    """The numbers the FLOP formula needs, read from a model directory's config.json."""

    hidden: int
    intermediate: int
    layers: int
    q_size: int
    kv_size: int
    vocab: int

    @staticmethod
    def from_dir(model_dir: str | Path) -> ModelShape:
        """Parse config.json (Llama-family keys)."""
        raw = json.loads((Path(model_dir) / "config.json").read_text())
        heads = raw["num_attention_heads"]
        head_dim = raw.get("head_dim") or raw["hidden_size"] // heads
        return ModelShape(
            hidden=raw["hidden_size"],
            intermediate=raw["intermediate_size"],
            layers=raw["num_hidden_layers"],
            q_size=heads * head_dim,
            kv_size=(raw.get("num_key_value_heads") or heads) * head_dim,
            vocab=raw["vocab_size"],
        )

    @property
    def non_embedding_params(self) -> int:
        """Weights of the layers' matmuls (q, k, v, o, gate, up, down); norms are negligible."""
        h = self.hidden
        per_layer = (
            h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 3 * h * self.intermediate
        )
        return self.layers * per_layer

    @property
    def lm_head_params(self) -> int:
        """hidden x vocab."""
        return self.hidden * self.vocab

    def gemm_shapes(self) -> list[tuple[int, int]]:
        """(in_features, out_features) of each per-layer linear, as livelm fuses them."""
        h = self.hidden
        return [
            (h, self.q_size + 2 * self.kv_size),  # qkv_proj
            (self.q_size, h),  # o_proj
            (h, 2 * self.intermediate),  # gate_up_proj
            (self.intermediate, h),  # down_proj
        ]


FLOP_FORMULA = (
    "model FLOPs = 2 * N_nonemb * (prompt tokens + output tokens - requests)"
    " + 2 * hidden * vocab * output tokens;  attention score/value matmuls excluded"
    " (reported separately as attn FLOPs = 4 * layers * q_size * sum of context lengths)"
)


def model_flops(
    shape: ModelShape, prompt_lens: list[int], output_lens: list[int]
) -> dict[str, float]:
    """FLOPs of serving these requests once each (no recompute), per :data:`FLOP_FORMULA`.

    Every prompt token and every output token but the last goes through the layers; each
    output token is sampled from one lm_head row. Attention counts each query against its
    causal context (positions 0..p), QK^T and PV each 2 * q_size MACs-to-FLOPs per key.
    """
    forward_tokens = sum(prompt_lens) + sum(max(o - 1, 0) for o in output_lens)
    sampled = sum(output_lens)
    dense = 2.0 * shape.non_embedding_params * forward_tokens + 2.0 * shape.lm_head_params * sampled
    # sum over query positions p in [0, L) of (p + 1) keys = L (L + 1) / 2, L = p_len + o_len - 1.
    ctx = sum((p + o - 1) * (p + o) / 2 for p, o in zip(prompt_lens, output_lens, strict=True))
    attn = 4.0 * shape.layers * shape.q_size * ctx
    return {
        "forward_tokens": forward_tokens,
        "sampled_tokens": sampled,
        "dense_flops": dense,
        "attn_flops": attn,
    }


# ----------------------------------------------------------------------------- roofline


def _best_seconds(fn, repeats: int, min_seconds: float) -> float:
    fn()  # warm-up (allocator, oneDNN/MKL kernel choice)
    iters = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        if time.perf_counter() - t0 >= min_seconds / 4 or iters >= 1024:
            break
        iters *= 2
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        best = min(best, (time.perf_counter() - t0) / iters)
    return best


def measure_matmul_gflops(
    shape: ModelShape, rows: int = 2048, repeats: int = 5, min_seconds: float = 0.2
) -> dict[str, float]:
    """fp32 GFLOP/s of the model's own GEMM shapes (``rows`` tokens x each linear layer).

    Each shape is timed with both fp32 GEMM libraries torch ships on CPU, MKL (what
    ``F.linear`` calls) and oneDNN with a pre-packed weight (much faster than MKL on AMD
    CPUs, where MKL runs its AVX2 code), and with livelm's own panel GEMM where its
    kernels are built for AVX-512 (what livelm uses there). Returns the best GFLOP/s of
    each shape over all of them (best of ``repeats`` timings, each at least
    ``min_seconds`` long), ``peak`` (the best shape) and ``model_mix`` (one layer's four
    GEMMs together: total FLOPs / summed best times), and the same per library
    (``mkl_peak``, ``onednn_peak``, ``panel_peak``). ``peak`` is the roofline MFU uses.
    """
    from livelm.layers.packed_linear import (
        PackedLinear,
        PanelLinear,
        onednn_available,
        panel_kernels,
    )

    result: dict[str, float] = {}
    per_lib: dict[str, dict[str, float]] = {"mkl": {}, "onednn": {}, "panel": {}}
    panel = panel_kernels()
    total_flops = total_time = 0.0
    with torch.inference_mode():
        for k, n in shape.gemm_shapes():
            x = torch.randn(rows, k)
            w = torch.randn(n, k)
            flops = 2.0 * rows * k * n
            times = {"mkl": _best_seconds(functools.partial(F.linear, x, w), repeats, min_seconds)}
            if onednn_available(w):
                packed = PackedLinear(w, None)
                times["onednn"] = _best_seconds(functools.partial(packed, x), repeats, min_seconds)
            if panel is not None:
                own = PanelLinear(w, None, panel)
                times["panel"] = _best_seconds(functools.partial(own.forward, x), repeats, min_seconds)
            key = f"{rows}x{k}@{k}x{n}"
            for lib, t in times.items():
                per_lib[lib][key] = flops / t / 1e9
            best = min(times.values())
            result[key] = flops / best / 1e9
            total_flops += flops
            total_time += best
    result["peak"] = max(result.values())
    result["model_mix"] = total_flops / total_time / 1e9
    for lib, vals in per_lib.items():
        if vals:
            result[f"{lib}_peak"] = max(vals.values())
    return result


# ----------------------------------------------------------------------------- records


def utc_now() -> str:
    """ISO-8601 UTC timestamp, to the second."""
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON object as a line (creating the folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def kernel_path() -> str:
    """The instruction sets livelm's quantized kernels were compiled for: the fp32-activation
    kernels (avx512 / avx2 / scalar) and the int8-activation ones (avx512-vnni / avx2 /
    scalar), or "torch" where they could not be built."""
    from livelm.kernels.extensions import int8_linear_kernels, quant_linear_kernels

    ext, ext8 = quant_linear_kernels(), int8_linear_kernels()
    return (f"quantized {'torch (no compiled kernels)' if ext is None else ext.simd()}, "
            f"int8 activations {'torch' if ext8 is None else ext8.simd()}")
