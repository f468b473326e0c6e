"""Fused RMSNorm (with the residual add), SiLU-and-multiply (GELU-and-multiply) and rotary for the decoder layers.

fp32 CPU tensors go through the C++ kernels of ``livelm/kernels/csrc/fused_ops.cpp``
(compiled on first use, like the attention kernels); everything else, or a machine without
a compiler, or ``LIVELM_DISABLE_CPP_KERNELS=1``, takes the torch ops, with the same
arithmetic (but SiLU on AVX-512, whose exp differs from torch's by ~2e-7 relative).
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F

from livelm.kernels.extensions import fused_ops_kernels


def _kernels_for(x: torch.Tensor) -> ModuleType | None:
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return None
    return fused_ops_kernels()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of the last dimension, in fp32 as transformers computes it."""
    k = _kernels_for(x)
    if k is not None and x.dim() == 2 and x.stride(1) == 1 and weight.dtype == torch.float32:
        return k.rms_norm(x, weight, eps)
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def add_rms_norm(
    delta: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual + delta`` and its RMSNorm: returns (normed, new residual).

    Both inputs may be overwritten (they are this step's temporaries).
    """
    k = _kernels_for(delta)
    if (
        k is not None
        and delta.dim() == 2
        and delta.is_contiguous()
        and residual.is_contiguous()
        and residual.dtype == torch.float32
        and weight.dtype == torch.float32
    ):
        k.add_rms_norm_(delta, residual, weight, eps)
        return delta, residual
    residual = residual + delta
    return rms_norm(residual, weight, eps), residual


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of a fused [T, 2 * I] gate|up projection."""
    k = _kernels_for(gate_up)
    if k is not None and gate_up.dim() == 2 and gate_up.stride(1) == 1:
        return k.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``gelu(gate, tanh approximation) * up`` of a fused [T, 2 * I] gate|up projection
    (GeGLU, Gemma's feed-forward): torch's own op, as transformers runs it."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def rotary_inplace(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, head_dim: int
) -> bool:
    """Rotate the first ``num_heads`` heads (q then k) of each fused qkv row in place.

    ``cos``/``sin`` are [T, 1, head_dim / 2]. Returns False (nothing done) where no kernel
    applies; the caller then uses ``apply_rotary``.
    """
    k = _kernels_for(qkv)
    if k is None or qkv.dim() != 2 or qkv.stride(1) != 1 or cos.dtype != torch.float32:
        return False
    k.rotary_(qkv, cos, sin, num_heads, head_dim)
    return True
