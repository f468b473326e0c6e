"""Llama 3.1-3.3's RoPE scaling in a GGUF file, read back into transformers' terms.

llama.cpp's converter stores Llama 3's ``rope_scaling`` (type llama3) only as a tensor,
``rope_freqs.weight``: one divisor per rotated pair, 1 for high frequencies, ``factor``
for low ones, ``1 / ((1 - s) / factor + s)`` in the band between, where
``s = (old_len / wavelen - low) / (high - low)``. The original parameters are recovered:
``factor`` is the largest divisor, and ``s`` is linear in ``1 / wavelen``, so two band
entries give ``old_len / (high - low)`` and ``low / (high - low)``; with ``old_len`` from
the file's metadata (8192, Llama 3's and the converter's default, where absent) that names
``low`` and ``high``. The recovered parameters must reproduce every divisor of the tensor,
else the file is refused: a wrong guess would be wrong output at every position.
"""

from __future__ import annotations

import math

import numpy as np

ROPE_FREQS = "rope_freqs.weight"
_DEFAULT_ORIGINAL = 8192
_TOLERANCE = 1e-5  # relative: the tensor is fp32, the recovery float64


def llama3_divisors(theta: float, head_dim: int, factor: float, low: float, high: float, old_len: int) -> np.ndarray:
    """The divisors llama.cpp's converter writes for a llama3 rope_scaling."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            out.append(1.0)
        elif wavelen > old_len / low:
            out.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out)


def llama3_scaling_from_rope_freqs(
    divisors: np.ndarray, theta: float, head_dim: int, original: int | None
) -> dict[str, object]:
    """The ``rope_scaling`` dict (type llama3) whose divisors are ``divisors``; ValueError
    when no llama3 scaling reproduces them."""
    divisors = np.asarray(divisors, dtype=np.float64)
    if divisors.shape != (head_dim // 2,):
        raise ValueError(f"GGUF tensor {ROPE_FREQS!r} has {divisors.size} entries; the model rotates {head_dim // 2} pairs")
    old_len = int(original or _DEFAULT_ORIGINAL)
    factor = float(divisors.max())
    candidates = [(1.0, 4.0)]  # Llama 3.1-3.3's own values, for a band too narrow to fit
    if factor > 1:
        wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        band = (divisors > 1 + _TOLERANCE) & (divisors < factor * (1 - _TOLERANCE))
        if band.sum() >= 2:
            smooth = (1 / divisors[band] - 1 / factor) / (1 - 1 / factor)
            a, minus_b = np.polyfit(1 / wavelen[band], smooth, 1)
            b = -minus_b
            if a > 0:
                low, high = old_len * b / a, old_len * (1 + b) / a
                candidates.insert(0, (float(_round(low)), float(_round(high))))
    for low, high in candidates:
        if low <= 0 or high <= low:
            continue
        want = llama3_divisors(theta, head_dim, factor, low, high, old_len)
        if np.allclose(want, divisors, rtol=_TOLERANCE, atol=0):
            return {
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low,
                "high_freq_factor": high,
                "original_max_position_embeddings": old_len,
            }
    raise ValueError(
        f"GGUF tensor {ROPE_FREQS!r} matches no llama3 rope scaling (factor {factor:g}, original "
        f"context {old_len}); livelm supports rope_freqs only as Llama 3.1-3.3 write it"
    )


def _round(x: float) -> float:
    # The fit lands within float error of the config's values (1.0, 4.0, ...): snap them.
    r = round(x, 4)
    return r if abs(r - x) <= 1e-6 * max(1.0, abs(x)) else x
