"""Rotary position embedding applied to a tensor: the one implementation the models
(models/rope.py builds the tables) and the sinks attention path (rotating by cache
position) share."""

from __future__ import annotations

import torch


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, H, D] in "rotate half" layout; with partial rotary (``cos`` narrower
    than D / 2) only the first ``2 * cos.shape[-1]`` dimensions, the rest passed through.

    Same arithmetic as transformers' ``x * cos + rotate_half(x) * sin`` (negation is exact),
    without building the rotated copy.
    """
    half = cos.shape[-1]
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    out = torch.empty_like(x)
    torch.mul(x1, cos, out=out[..., :half]).sub_(x2 * sin)
    torch.mul(x2, cos, out=out[..., half : 2 * half]).add_(x1 * sin)
    if 2 * half < x.shape[-1]:
        out[..., 2 * half :] = x[..., 2 * half :]
    return out
