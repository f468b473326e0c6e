"""Quantized weights times int8-quantized activations (``activation_quantization="int8"``).

Each row of the activations x is quantized per 32-element block as llama.cpp's q8_0 does
(``dx = max|x| / 127``, ``xq = round(x / dx)``), and each block's dot product with the
weight's integers runs in integer arithmetic; the scales are applied to the block sums in
fp32 (the formula is in ``livelm/kernels/csrc/int8_linear.cpp``). That trades a bounded
rounding of x (at most dx / 2 per element) for 2-4x more multiply-adds per instruction
(AVX512-VNNI ``vpdpbusd``; ``vpmaddubsw`` on AVX2). Opt-in: fp32 activations stay exact to
the dequantized weights, this mode is held to a perplexity bound instead
(``benchmarks/perplexity.py``, docs/quantization.md).

Weights in q8_0, q4_0 and q4_1 take this path; other formats keep fp32 activations.
Without the C++ kernels the same arithmetic runs in torch (exact integers, slower).
"""

from __future__ import annotations

import torch

from livelm.kernels.extensions import int8_linear_kernels
from livelm.quant.formats import BLOCK, FORMAT_CODES, QuantizedTensor, unpack_nibbles

# Weight formats whose matmuls can take int8 activations.
INT8_ACTIVATION_FORMATS: tuple[str, ...] = ("q8_0", "q4_0", "q4_1")


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] fp32 (K % 32 == 0) -> (xq int8 [M, K], dx fp32 [M, K/32], dx * sum(xq) [M, K/32])."""
    ext = int8_linear_kernels()
    if ext is not None:
        return ext.quantize_activations(x.float().contiguous())
    m, k = x.shape
    blocks = x.float().reshape(m, k // BLOCK, BLOCK)
    d = blocks.abs().amax(dim=-1) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / torch.where(d == 0, torch.ones_like(d), d))
    q = torch.round(blocks * inv[..., None]).clamp(-127, 127)
    return q.to(torch.int8).reshape(m, k), d, d * q.sum(dim=-1)


def weight_integers(qt: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight's integers [N, K/32, 32] (q8_0 signed, q4 0..15) and each block's additive
    term c [N, K/32] (q4_1 the minimum, q4_0 -8 d, q8_0 0), as the kernels use them."""
    n, k = qt.shape
    d = qt.scales()
    if qt.fmt == "q8_0":
        return qt.qs.reshape(n, k // BLOCK, BLOCK).to(torch.int32), torch.zeros_like(d)
    q = unpack_nibbles(qt.qs, k).to(torch.int32)
    return q, (qt.mins() if qt.fmt == "q4_1" else -8 * d)


def int8_matmul_reference(xq: torch.Tensor, xd: torch.Tensor, xs: torch.Tensor, qt: QuantizedTensor,
                          bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``sum_b dw dx I + c xs`` with the block sums I exact (int32 products summed in
    ``dtype``: float32 is exact too, since |I| < 2^24) and the rest in ``dtype``."""
    u, c = weight_integers(qt)
    m, k = xq.shape
    x = xq.reshape(m, k // BLOCK, BLOCK).to(dtype)
    # [nb, M, 32] @ [nb, 32, N] -> the block sums [nb, M, N]; in row chunks to bound memory.
    ub = u.to(dtype).permute(1, 2, 0)
    dw, cw = qt.scales().to(dtype).T, c.to(dtype).T  # [nb, N]
    out = torch.empty(m, qt.shape[0], dtype=dtype)
    rows = max(1, (1 << 24) // max(1, ub.shape[0] * qt.shape[0]))
    for r0 in range(0, m, rows):
        xb = x[r0 : r0 + rows].permute(1, 0, 2)
        sums = torch.bmm(xb, ub)
        dx, s = xd[r0 : r0 + rows].to(dtype).T, xs[r0 : r0 + rows].to(dtype).T  # [nb, rows]
        out[r0 : r0 + rows] = (sums * (dx[:, :, None] * dw[:, None, :]) + s[:, :, None] * cw[:, None, :]).sum(0)
    if bias is not None:
        out += bias.to(dtype)
    return out


def int8_linear(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` with x quantized to int8 per 32-block (CPU; ``qt`` in one of
    :data:`INT8_ACTIVATION_FORMATS`); the result has x's dtype."""
    if qt.fmt not in INT8_ACTIVATION_FORMATS:
        raise ValueError(f"int8 activations need {', '.join(INT8_ACTIVATION_FORMATS)} weights, not {qt.fmt}")
    n, k = qt.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).float().contiguous()
    ext = int8_linear_kernels()
    if ext is not None:
        out = ext.int8_linear(x2, qt.qs, qt.d, qt.m, bias, FORMAT_CODES[qt.fmt])
    else:
        xq, xd, xs = quantize_activations(x2)
        out = int8_matmul_reference(xq, xd, xs, qt, bias, torch.float32)
    return out.to(x.dtype).reshape(*lead, n)
