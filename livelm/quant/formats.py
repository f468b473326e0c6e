"""Quantized weight formats: GGUF's 32-weight blocks (q8_0, q4_0, q4_1) and per-row int8,
plus GGUF's raw block formats (q5_0, q5_1, q4_k, q5_k, q6_k: ``livelm/quant/gguf_blocks.py``).

A weight [N, K] is kept as a :class:`QuantizedTensor`: the quantized values ``qs`` (one row
per output feature, in GGUF's byte order within a block), the block scales ``d`` and, for
q4_1, the block minimums ``m``. The math is GGUF's own (ggml-quants.c, gguf-py), so a
GGUF tensor is repacked bit-exactly, and :func:`quantize` gives the bytes llama.cpp's
quantizer would.

| format | weight value            | bytes per 32 weights |
|--------|-------------------------|----------------------|
| q8_0   | d * q, q in [-127, 127] | 34 (32 + fp16 d)     |
| q4_0   | d * (q - 8), q in 0..15 | 18 (16 + fp16 d)     |
| q4_1   | d * q + m, q in 0..15   | 20 (16 + fp16 d, m)  |
| int8   | s_row * q               | 32 (+ 4 per row)     |

The raw formats keep each row's GGUF blocks byte for byte in ``qs`` (uint8) and have no
``d`` or ``m`` tensors.

Scales are stored as raw bits (int16 for fp16, int32 for fp32) so that ``module.to(dtype)``
never casts them; :meth:`QuantizedTensor.scales` gives them as fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from livelm.quant.gguf_blocks import (
    QUANTIZABLE_RAW,
    RAW_LAYOUTS,
    dequantize_raw,
    quantize_raw,
    raw_row_bytes,
)

BLOCK = 32
FORMATS: tuple[str, ...] = ("q8_0", "q4_0", "q4_1", "int8", *RAW_LAYOUTS)
# Formats livelm can quantize float weights into (the K-quants are only loaded from GGUF).
QUANTIZE_FORMATS: tuple[str, ...] = ("q8_0", "q4_0", "q4_1", "int8", *QUANTIZABLE_RAW)
# The code each format has in the C++ kernels (csrc/quant_linear.cpp, csrc/gguf_blocks.h).
FORMAT_CODES: dict[str, int] = {"q8_0": 0, "q4_0": 1, "q4_1": 2, "int8": 3,
                                "q5_0": 4, "q5_1": 5, "q4_k": 6, "q5_k": 7, "q6_k": 8}  # fmt: skip
# Higher keeps more precision; used when fused parts disagree and must share one format.
PRECISION_RANK: dict[str, int] = {"q4_0": 0, "q4_1": 1, "q4_k": 2, "q5_0": 3, "q5_1": 4, "q5_k": 5,
                                  "q6_k": 6, "q8_0": 7, "int8": 8}  # fmt: skip


def check_format(fmt: str) -> str:
    """``fmt`` itself when it names a weight format, else ValueError listing them."""
    if fmt not in FORMATS:
        raise ValueError(f"unsupported quantization format {fmt!r}; supported: {', '.join(FORMATS)}")
    return fmt


def is_raw(fmt: str) -> bool:
    """Whether ``fmt`` keeps GGUF's block bytes in ``qs`` (no ``d`` / ``m`` tensors)."""
    return fmt in RAW_LAYOUTS


def block_weights(fmt: str) -> int:
    """Weights per block along a row (1 for int8)."""
    return 1 if fmt == "int8" else RAW_LAYOUTS[fmt][0] if is_raw(fmt) else BLOCK


def fits(fmt: str, in_features: int) -> bool:
    """Whether rows of ``in_features`` weights can be stored in ``fmt`` (whole blocks)."""
    return in_features % block_weights(fmt) == 0


@dataclass
class QuantizedTensor:
    """A [N, K] weight in one of :data:`FORMATS` (see the module docstring)."""

    fmt: str
    shape: tuple[int, int]
    qs: torch.Tensor
    d: torch.Tensor | None = None  # None for the raw formats
    m: torch.Tensor | None = None

    def scales(self) -> torch.Tensor:
        """The scales as fp32 ([N, K/32], or [N] for int8); not for the raw formats."""
        if self.d is None:
            raise ValueError(f"{self.fmt} keeps its scales inside its blocks")
        return _from_bits(self.d, self.fmt)

    def mins(self) -> torch.Tensor | None:
        """The q4_1 minimums as fp32 [N, K/32] (None for other formats)."""
        return None if self.m is None else _from_bits(self.m, self.fmt)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by suffix (``qs``, ``d`` and, for q4_1, ``m``; raw formats: ``qs``)."""
        out = {"qs": self.qs}
        if self.d is not None:
            out["d"] = self.d
        if self.m is not None:
            out["m"] = self.m
        return out

    @property
    def nbytes(self) -> int:
        """Bytes held by the quantized tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def rows(self, start: int, length: int) -> QuantizedTensor:
        """Rows [start, start + length) as a view."""
        d = None if self.d is None else self.d.narrow(0, start, length)
        m = None if self.m is None else self.m.narrow(0, start, length)
        return QuantizedTensor(self.fmt, (length, self.shape[1]), self.qs.narrow(0, start, length), d, m)

    def index_rows(self, perm: torch.Tensor) -> QuantizedTensor:
        """Rows ``perm`` (a 1-D index), in its order (rows are independent, so this is exact)."""
        d = None if self.d is None else self.d[perm]
        m = None if self.m is None else self.m[perm]
        return QuantizedTensor(self.fmt, (perm.numel(), self.shape[1]), self.qs[perm], d, m)


def _to_bits(scales: torch.Tensor, fmt: str) -> torch.Tensor:
    if fmt == "int8":
        return scales.float().contiguous().view(torch.int32)
    return scales.to(torch.float16).contiguous().view(torch.int16)


def _from_bits(bits: torch.Tensor, fmt: str) -> torch.Tensor:
    if fmt == "int8":
        return bits.contiguous().view(torch.float32)
    return bits.contiguous().view(torch.float16).float()


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """ggml's roundf (half away from zero), as gguf-py's np_roundf computes it."""
    a = x.abs()
    floored = a.floor()
    return torch.sign(x) * (floored + torch.floor(2 * (a - floored)))


def _safe_inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / torch.where(d == 0, torch.ones_like(d), d))


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[N, nb, 32] values 0..15 -> [N, nb*16] bytes: weight j low nibble, j + 16 high."""
    q = q.to(torch.uint8)
    packed = q[..., :16] | (q[..., 16:] << 4)
    return packed.reshape(q.shape[0], -1).contiguous()


def unpack_nibbles(qs: torch.Tensor, k: int) -> torch.Tensor:
    """[N, K/2] bytes -> [N, K/32, 32] values 0..15 (the inverse of :func:`pack_nibbles`)."""
    b = qs.reshape(qs.shape[0], k // BLOCK, 16)
    return torch.cat([b & 0x0F, b >> 4], dim=-1)


def quantize(w: torch.Tensor, fmt: str) -> QuantizedTensor:
    """Quantize a float [N, K] weight exactly as GGUF's reference quantizer does.

    Raises ValueError for an unknown format, a format livelm cannot quantize into (the
    K-quants) or (block formats) K not a multiple of 32.
    """
    check_format(fmt)
    if fmt not in QUANTIZE_FORMATS:
        raise ValueError(f"livelm has no quantizer for {fmt} (it is only loaded from GGUF files); "
                         f"quantizable: {', '.join(QUANTIZE_FORMATS)}")
    if w.dim() != 2:
        raise ValueError(f"can only quantize 2-D weights, got shape {tuple(w.shape)}")
    n, k = w.shape
    if not fits(fmt, k):
        raise ValueError(f"{fmt} needs rows of whole {BLOCK}-weight blocks; this weight has {k} columns")
    if is_raw(fmt):
        return QuantizedTensor(fmt, (n, k), quantize_raw(w, fmt))
    w = w.detach().float()
    if fmt == "int8":
        s = w.abs().amax(dim=1) / 127
        q = _round_half_away(w * _safe_inverse(s)[:, None]).clamp(-127, 127).to(torch.int8)
        return QuantizedTensor(fmt, (n, k), q.contiguous(), _to_bits(s, fmt))
    blocks = w.reshape(n, k // BLOCK, BLOCK)
    if fmt == "q8_0":
        d = blocks.abs().amax(dim=-1, keepdim=True) / 127
        q = _round_half_away(blocks * _safe_inverse(d)).to(torch.int8)
        return QuantizedTensor(fmt, (n, k), q.reshape(n, k).contiguous(), _to_bits(d.squeeze(-1), fmt))
    if fmt == "q4_0":
        imax = blocks.abs().argmax(dim=-1, keepdim=True)
        d = torch.gather(blocks, -1, imax) / -8
        q = torch.trunc(blocks * _safe_inverse(d) + 8.5).clamp(0, 15)
        return QuantizedTensor(fmt, (n, k), pack_nibbles(q), _to_bits(d.squeeze(-1), fmt))
    lo, hi = blocks.amin(dim=-1, keepdim=True), blocks.amax(dim=-1, keepdim=True)
    d = (hi - lo) / 15
    q = torch.trunc((blocks - lo) * _safe_inverse(d) + 0.5).clamp(0, 15)
    return QuantizedTensor(fmt, (n, k), pack_nibbles(q), _to_bits(d.squeeze(-1), fmt), _to_bits(lo.squeeze(-1), fmt))


def dequantize(qt: QuantizedTensor) -> torch.Tensor:
    """The exact fp32 weight [N, K] (bit-identical to gguf-py's dequantization)."""
    n, k = qt.shape
    if is_raw(qt.fmt):
        return dequantize_raw(qt.fmt, qt.qs, k)
    d = qt.scales()
    if qt.fmt == "int8":
        return qt.qs.float() * d[:, None]
    if qt.fmt == "q8_0":
        q = qt.qs.reshape(n, k // BLOCK, BLOCK).float()
    else:
        q = unpack_nibbles(qt.qs, k).float()
        if qt.fmt == "q4_0":
            q = q - 8
    w = d[..., None] * q
    if qt.fmt == "q4_1":
        w = w + qt.mins()[..., None]
    return w.reshape(n, k)


def empty_quantized(fmt: str, n: int, k: int, device: torch.device | str | None = None) -> QuantizedTensor:
    """Uninitialized storage for a [n, k] weight in ``fmt`` (filled row range by row range)."""
    check_format(fmt)
    if not fits(fmt, k):
        raise ValueError(f"{fmt} needs rows of whole {block_weights(fmt)}-weight blocks; this weight has {k} columns")
    if is_raw(fmt):
        return QuantizedTensor(fmt, (n, k), torch.empty(n, raw_row_bytes(fmt, k), dtype=torch.uint8, device=device))
    if fmt == "int8":
        return QuantizedTensor(fmt, (n, k), torch.empty(n, k, dtype=torch.int8, device=device),
                               torch.empty(n, dtype=torch.int32, device=device))
    nb = k // BLOCK
    qs_dtype, qs_cols = (torch.int8, k) if fmt == "q8_0" else (torch.uint8, k // 2)
    d = torch.empty(n, nb, dtype=torch.int16, device=device)
    m = torch.empty(n, nb, dtype=torch.int16, device=device) if fmt == "q4_1" else None
    return QuantizedTensor(fmt, (n, k), torch.empty(n, qs_cols, dtype=qs_dtype, device=device), d, m)


def bytes_per_weight(fmt: str) -> float:
    """Average bytes per weight of ``fmt`` (int8 without its per-row scale)."""
    if is_raw(check_format(fmt)):
        qk, nbytes = RAW_LAYOUTS[fmt]
        return nbytes / qk
    return {"q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32, "int8": 1.0}[fmt]
