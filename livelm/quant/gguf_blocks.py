"""GGUF's block formats kept as the file stores them: q5_0, q5_1 and the K-quants q4_k,
q5_k, q6_k.

A weight [N, K] in one of these is one uint8 tensor ``qs`` [N, K / QK * bytes]: each row's
blocks, byte for byte as in the GGUF file (no separate scale tensors). The C++ kernels
(``csrc/gguf_blocks.h``) decode the same bytes; the torch code here is the fallback (no
compiler, CUDA) and follows gguf-py's dequantization operation by operation, so its
weights are bit-identical to gguf-py's.

| format | weights / block | bytes / block | bits / weight | weight value |
|--------|-----------------|---------------|---------------|--------------|
| q5_0   | 32              | 22            | 5.5           | d * (q - 16) |
| q5_1   | 32              | 24            | 6.0           | d * q + m    |
| q4_k   | 256             | 144           | 4.5           | d*sc * q - dmin*mn (8 groups of 32) |
| q5_k   | 256             | 176           | 5.5           | as q4_k with a 5th bit |
| q6_k   | 256             | 210           | 6.5625        | d*sc * (q - 32) (16 groups of 16) |

q5_0 and q5_1 have quantizers (gguf-py's, in torch); the K-quants are load-only: their
llama.cpp quantizer searches scales iteratively, and a naive one would store worse weights
than the files people download.
"""

from __future__ import annotations

import torch

# format -> (weights per block, bytes per block)
RAW_LAYOUTS: dict[str, tuple[int, int]] = {
    "q5_0": (32, 22),
    "q5_1": (32, 24),
    "q4_k": (256, 144),
    "q5_k": (256, 176),
    "q6_k": (256, 210),
}
# Raw formats that :func:`quantize_raw` can make from float weights.
QUANTIZABLE_RAW: tuple[str, ...] = ("q5_0", "q5_1")


def raw_row_bytes(fmt: str, k: int) -> int:
    """Bytes of one row of ``k`` weights in raw format ``fmt``."""
    qk, nbytes = RAW_LAYOUTS[fmt]
    return k // qk * nbytes


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] bytes -> [...] fp32 (the fp16 they hold)."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _nibbles(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return b & 0x0F, b >> 4


def dequantize_raw(fmt: str, qs: torch.Tensor, k: int) -> torch.Tensor:
    """The exact fp32 weight [N, K] of the raw blocks ``qs`` [N, row bytes]."""
    qk, nbytes = RAW_LAYOUTS[fmt]
    n, nb = qs.shape[0], k // qk
    blocks = qs.reshape(n, nb, nbytes)
    if fmt in ("q5_0", "q5_1"):
        off = 4 if fmt == "q5_1" else 2
        d = _f16(blocks[..., 0:2])[..., None]
        qh = blocks[..., off : off + 4].contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        shifts = torch.arange(32, device=qs.device)
        high = ((qh >> shifts) & 1).to(torch.uint8)
        lo, hi = _nibbles(blocks[..., off + 4 :])
        q = torch.cat([lo, hi], dim=-1) | (high << 4)
        if fmt == "q5_0":
            w = d * (q.to(torch.int8) - 16).float()
        else:
            w = d * q.float() + _f16(blocks[..., 2:4])[..., None]
        return w.reshape(n, k)
    if fmt in ("q4_k", "q5_k"):
        d, dmin = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
        sc, mn = _scale_min_k4(blocks[..., 4:16])
        first = 48 if fmt == "q5_k" else 16
        lo, hi = _nibbles(blocks[..., first:].reshape(n, nb, 4, 1, 32))
        q = torch.cat([lo, hi], dim=3).reshape(n, nb, 8, 32)
        if fmt == "q5_k":
            shifts = torch.arange(8, dtype=torch.uint8, device=qs.device).reshape(8, 1)
            q = q | (((blocks[..., 16:48].reshape(n, nb, 1, 32) >> shifts) & 1) << 4)
        scale = (d[..., None] * sc.float())[..., None]
        minimum = (dmin[..., None] * mn.float())[..., None]
        return (scale * q.float() - minimum).reshape(n, k)
    # q6_k
    lo, hi = _nibbles(blocks[..., 0:128].reshape(n, nb, 2, 1, 64))
    ql = torch.cat([lo, hi], dim=3).reshape(n, nb, 8, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=qs.device).reshape(4, 1)
    qh = ((blocks[..., 128:192].reshape(n, nb, 2, 1, 32) >> shifts) & 3).reshape(n, nb, 8, 32)
    q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(n, nb, 16, 16).float()
    scales = blocks[..., 192:208].contiguous().view(torch.int8).float()
    d = _f16(blocks[..., 208:210])
    return ((d[..., None] * scales)[..., None] * q).reshape(n, k)


def _scale_min_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 6-bit scales and minimums [..., 8] packed in 12 bytes [..., 12] (q4_k, q5_k)."""
    a, b, c = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)], dim=-1)
    mn = torch.cat([b & 0x3F, (c >> 4) | ((b >> 2) & 0x30)], dim=-1)
    return sc, mn


def _safe_inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / torch.where(d == 0, torch.ones_like(d), d))


def quantize_raw(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """Float [N, K] (K a multiple of 32) -> q5_0 / q5_1 raw blocks, the bytes gguf-py's
    quantizer makes."""
    if fmt not in QUANTIZABLE_RAW:
        raise ValueError(f"livelm has no quantizer for {fmt}; it can only be loaded from a GGUF file")
    n, k = w.shape
    blocks = w.detach().float().reshape(n, k // 32, 32)
    if fmt == "q5_0":
        imax = blocks.abs().argmax(dim=-1, keepdim=True)
        d = torch.gather(blocks, -1, imax) / -16
        q = torch.trunc(blocks * _safe_inverse(d) + 16.5).clamp(0, 31).to(torch.uint8)
        head = [d]
    else:
        lo, hi = blocks.amin(dim=-1, keepdim=True), blocks.amax(dim=-1, keepdim=True)
        d = (hi - lo) / 31
        q = torch.trunc((blocks - lo) * _safe_inverse(d) + 0.5).clamp(0, 31).to(torch.uint8)
        head = [d, lo]
    parts = [h.to(torch.float16).view(torch.uint8) for h in head]  # [n, nb, 2] each
    bits = ((q >> 4).to(torch.int64) << torch.arange(32)).sum(-1, keepdim=True)
    bits = torch.where(bits >= 1 << 31, bits - (1 << 32), bits)  # the uint32's bits as int32
    parts.append(bits.to(torch.int32).view(torch.uint8))  # little-endian
    parts.append((q[..., :16] & 0x0F) | (q[..., 16:] << 4))
    return torch.cat(parts, dim=-1).reshape(n, -1).contiguous()
