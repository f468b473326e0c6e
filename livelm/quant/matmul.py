"""Matrix products with quantized weights: the C++ CPU kernels, their torch fallback, CUDA.

Plain functions over :class:`QuantizedTensor` (no nn.Module), so they stay in quant, next
to the formats whose bytes they read; the layers that hold quantized weights
(``livelm.layers.quantized``) call them.

- CPU, compiled for AVX-512: every call goes to ``livelm/kernels/csrc/quant_linear.cpp``:
  fused dequantize-and-multiply tiles for decode-sized rows (each weight byte read once,
  prefetched ahead), an outer-product GEMM over weights dequantized 12 rows at a time for
  20-127 rows (batched decode), and from 128 rows (prefill) weights dequantized into the
  column panels of livelm's fp32 GEMM (``csrc/panel_gemm.h``), as fast as fp32 weights.
- CPU, compiled for AVX2 only: the fused kernel up to ``FUSED_MAX_ROWS_AVX2`` rows; more
  rows are dequantized tile by tile (exactly) into fp32 and multiplied by an fp32 GEMM:
  oneDNN's where torch has it (faster than MKL's on AMD CPUs, see docs/kernels.md), else
  ``F.linear``.
- No compiler, or ``LIVELM_DISABLE_CPP_KERNELS=1``: the same tiles dequantized with torch
  ops (same results, slower; said once in the log).
- CUDA: the weight is dequantized with torch ops into the activations' dtype, then matmul.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from types import ModuleType

import torch
import torch.nn.functional as F

from livelm.kernels.extensions import quant_linear_kernels
from livelm.quant.formats import BLOCK, FORMAT_CODES, QuantizedTensor, dequantize

logger = logging.getLogger("livelm")


# Rows of activations up to which the AVX2 fused kernel beats dequantize + fp32 GEMM.
# Measured on an AVX2-only AMD EPYC (2 threads, all linears of SmolLM2-135M, q4_1/q8_0,
# and q4_k/q6_k/q5_0 at its shapes; docs/quantization.md): the fused kernel takes
# 0.42-0.58x the tiles' time at 12 rows, 0.81-0.99x at 32, 0.83-0.97x at 48 and
# 0.98-1.09x at 64 (the tiles pay a fixed dequantization of every weight per call).
# AVX-512 builds take every row count (their GEMM path beats the tiles, see fused_max_rows).
FUSED_MAX_ROWS_AVX2 = 48
# Where the AVX-512 build's dispatcher changes kernel (kGemmMinRows / kPanelMinRows in
# csrc/quant_linear.cpp): fused tiles below 20 rows, the outer-product GEMM below 128.
_AVX512_ROW_SWITCHES = (19, 127)
# Weights dequantized per tile of the prefill path: 1 MiB of fp32, about one L2 cache.
_TILE_WEIGHTS = 1 << 18


@functools.cache
def fused_max_rows(ext: ModuleType) -> int:
    """Rows of activations up to which ``ext.quantized_matmul`` is the faster CPU path."""
    simd = ext.simd() if hasattr(ext, "simd") else "avx2"
    return sys.maxsize if simd == "avx512" else FUSED_MAX_ROWS_AVX2


def kernel_row_breakpoints(ext: ModuleType | None) -> tuple[int, ...]:
    """Row counts after which a CPU quantized matmul changes kernel (the step cost model's
    breakpoints, core/step_cost.py): none without the C++ kernels (one torch path)."""
    if ext is None:
        return ()
    return _AVX512_ROW_SWITCHES if fused_max_rows(ext) == sys.maxsize else (FUSED_MAX_ROWS_AVX2,)


def _kernel_args(qt: QuantizedTensor) -> tuple:
    return qt.qs, qt.d, qt.m, FORMAT_CODES[qt.fmt]


def dequantize_rows(qt: QuantizedTensor, start: int, length: int) -> torch.Tensor:
    """Exact fp32 rows [start, start + length) of ``qt``."""
    ext = quant_linear_kernels() if qt.qs.device.type == "cpu" else None
    if ext is None:
        return dequantize(qt.rows(start, length))
    qs, d, m, code = _kernel_args(qt)
    return ext.dequantize_rows(qs, d, m, code, qt.shape[1], start, length, None)


def embedding_rows(qt: QuantizedTensor, ids: torch.Tensor) -> torch.Tensor:
    """Exact fp32 rows ``ids`` of ``qt`` (an embedding lookup that dequantizes only those)."""
    flat = ids.reshape(-1)
    ext = quant_linear_kernels() if qt.qs.device.type == "cpu" else None
    if ext is None:
        rows = dequantize(qt.index_rows(flat))
    else:
        qs, d, m, code = _kernel_args(qt)
        rows = ext.dequantize_rows(qs, d, m, code, qt.shape[1], 0, 0, flat)
    return rows.reshape(*ids.shape, qt.shape[1])


def quantized_linear(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequantize(qt).T + bias`` for ``x`` [..., K]; the result has ``x``'s dtype."""
    n, k = qt.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x.device.type == "cuda":
        _say_cuda_path()
        w = dequantize(qt).to(x.dtype)
        return F.linear(x2, w, None if bias is None else bias.to(x.dtype)).reshape(*lead, n)
    xf = x2.float()
    ext = quant_linear_kernels()
    if ext is not None and xf.shape[0] <= fused_max_rows(ext):
        qs, d, m, code = _kernel_args(qt)
        out = ext.quantized_matmul(xf.contiguous(), qs, d, m, bias, code)
    else:
        out = _tiled_linear(xf, qt, bias)
    return out.to(x.dtype).reshape(*lead, n)


@functools.cache
def _onednn_linear():
    """oneDNN's fp32 linear (plain weight layout), or None where torch lacks it or it is off."""
    if os.environ.get("LIVELM_DISABLE_ONEDNN") == "1" or not torch.backends.mkldnn.is_available():
        return None
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None:
        return None
    try:  # some builds register the op but cannot run it on this CPU
        op(torch.ones(2, 8), torch.ones(4, 8), None, "none", [], "")
    except Exception as e:  # noqa: BLE001 - any failure means: use F.linear
        logger.info("oneDNN linear unavailable (%s); quantized prefill uses F.linear", e)
        return None
    return op


def _gemm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    op = _onednn_linear()
    if op is None:
        return F.linear(x, w, bias)
    return op(x, w, bias, "none", [], "")


@functools.cache
def _say_cuda_path() -> None:
    logger.info("quantized weights on CUDA are dequantized per call with torch ops (no fused CUDA kernel yet)")


def _tiled_linear(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Dequantize ``qt`` tile by tile into fp32 GEMMs (memory: one tile, not the weight)."""
    n, k = qt.shape
    x = x.contiguous()
    tile = max(BLOCK, _TILE_WEIGHTS // max(k, 1) // BLOCK * BLOCK)
    if tile >= n:
        return _gemm(x, dequantize_rows(qt, 0, n), None if bias is None else bias.float())
    out = torch.empty(x.shape[0], n, dtype=torch.float32, device=x.device)
    for start in range(0, n, tile):
        length = min(tile, n - start)
        w = dequantize_rows(qt, start, length)
        b = None if bias is None else bias[start : start + length].float()
        out[:, start : start + length] = _gemm(x, w, b)
    return out
