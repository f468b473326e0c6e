"""A reference quantizer for GGUF's K-quants (Q4_K, Q5_K, Q6_K), written from the block
layouts of ggml's common header, independent of livelm: gguf-py can dequantize these types
but not make them. Simple min/max scales (llama.cpp searches for better ones; any valid
bytes serve the tests, whose oracle is gguf-py's dequantization of the same bytes).

:func:`quantize` also covers the types gguf-py can quantize itself, so tests can ask for
any of them by name.
"""

from __future__ import annotations

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType
QK_K = 256


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16).view(np.uint8).reshape(*v.shape[:-1], 2)


def _pack_scales_k4(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """[n, 8] 6-bit scales and minimums -> [n, 12] bytes (the get_scale_min_k4 layout)."""
    out = np.zeros((sc.shape[0], 12), np.uint8)
    for g in range(4):
        out[:, g] = sc[:, g] | ((sc[:, g + 4] >> 4) << 6)
        out[:, g + 4] = mn[:, g] | ((mn[:, g + 4] >> 4) << 6)
        out[:, g + 8] = (sc[:, g + 4] & 0x0F) | ((mn[:, g + 4] & 0x0F) << 4)
    return out


def _q45_k(blocks: np.ndarray, bits: int) -> np.ndarray:
    n = blocks.shape[0]
    levels = (1 << bits) - 1
    x = blocks.reshape(n, 8, 32).astype(np.float32)
    lo = np.minimum(x.min(axis=-1), 0)
    scale = (x.max(axis=-1) - lo) / levels
    d = (scale.max(axis=-1, keepdims=True) / 63).astype(np.float16).astype(np.float32)
    dmin = ((-lo).max(axis=-1, keepdims=True) / 63).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(np.divide(scale, d, out=np.zeros_like(scale), where=d > 0)), 0, 63).astype(np.uint8)
    mn = np.clip(np.rint(np.divide(-lo, dmin, out=np.zeros_like(lo), where=dmin > 0)), 0, 63).astype(np.uint8)
    step = (d * sc)[..., None]
    q = np.divide(x + (dmin * mn)[..., None], step, out=np.zeros_like(x), where=step > 0)
    q = np.clip(np.rint(q), 0, levels).astype(np.uint8).reshape(n, 4, 2, 32)  # chunk, half, l
    qs = (q[:, :, 0] & 0x0F) | ((q[:, :, 1] & 0x0F) << 4)
    parts = [_f16_bytes(d), _f16_bytes(dmin), _pack_scales_k4(sc, mn)]
    if bits == 5:
        high = (q.reshape(n, 8, 32) >> 4) & 1  # group g's 5th bits -> bit g of byte l
        parts.append((high << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1).astype(np.uint8))
    parts.append(qs.reshape(n, 128))
    return np.concatenate(parts, axis=-1)


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    x = blocks.reshape(n, 16, 16).astype(np.float32)
    scale = np.abs(x).max(axis=-1) / 31
    d = (scale.max(axis=-1, keepdims=True) / 127).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(np.divide(scale, d, out=np.zeros_like(scale), where=d > 0)), -128, 127).astype(np.int8)
    step = (d * sc)[..., None]
    q = np.divide(x, step, out=np.zeros_like(x), where=step != 0)
    q = (np.clip(np.rint(q), -32, 31) + 32).astype(np.uint8).reshape(n, 2, 4, 32)  # half, quarter, l
    ql = np.concatenate([q[:, :, 0] & 0x0F | (q[:, :, 2] & 0x0F) << 4,
                         q[:, :, 1] & 0x0F | (q[:, :, 3] & 0x0F) << 4], axis=-1)  # [n, 2, 64]
    qh = (q[:, :, 0] >> 4) | (q[:, :, 1] >> 4) << 2 | (q[:, :, 2] >> 4) << 4 | (q[:, :, 3] >> 4) << 6
    return np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), sc.view(np.uint8), _f16_bytes(d)], axis=-1)


def quantize(w: np.ndarray, qtype: Q) -> np.ndarray:
    """Float [rows, k] -> GGUF blocks of ``qtype`` [rows, k / block * bytes] (uint8)."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if qtype not in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        return gguf.quants.quantize(w, qtype)
    rows, k = w.shape
    assert k % QK_K == 0, f"{qtype.name} needs rows of whole 256-weight blocks, not {k}"
    blocks = w.reshape(-1, QK_K)
    out = _q6_k(blocks) if qtype == Q.Q6_K else _q45_k(blocks, 4 if qtype == Q.Q4_K else 5)
    return out.reshape(rows, -1)
