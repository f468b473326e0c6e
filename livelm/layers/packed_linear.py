"""fp32 linear layers on CPU with weights packed once at load.

- AVX-512 builds of livelm's kernels: :class:`PanelLinear`, weights in column panels
  ([K][16] per 16 outputs) and livelm's own GEMM (``livelm/kernels/csrc/panel_gemm.h``),
  faster than oneDNN on the models' shapes from decode to prefill, even at 4096 rows
  (docs/kernels.md).
- Otherwise :class:`PackedLinear`, oneDNN with its own packed layout (below).

torch's ``F.linear`` on CPU calls MKL, which runs its AVX2 code on AMD CPUs, where oneDNN
(bundled with torch, used by ``torch.ops.mkldnn``) is about twice as fast on the same
shapes, for decode steps and prefill chunks alike (figures in docs/kernels.md). The
weights are reordered once into oneDNN's blocked layout, so no call pays for a reorder.

The results are fp32 sums like MKL's, only in another order (differences ~1e-6 relative).
``LIVELM_DISABLE_PANEL_GEMM=1`` takes oneDNN instead of the panel GEMM, and
``LIVELM_DISABLE_ONEDNN=1`` as well keeps plain ``F.linear``.
"""

from __future__ import annotations

import functools
import logging
import os
from types import ModuleType

import torch
from torch import nn

from livelm.kernels.extensions import quant_linear_kernels

logger = logging.getLogger("livelm")


def onednn_available(weight: torch.Tensor) -> bool:
    """True when packed oneDNN linears apply to this weight (fp32 on CPU, oneDNN built in)."""
    if os.environ.get("LIVELM_DISABLE_ONEDNN") == "1":
        return False
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


@functools.cache
def panel_kernels() -> ModuleType | None:
    """The compiled quant_linear module when it holds the AVX-512 panel GEMM, else None."""
    ext = quant_linear_kernels()
    return ext if ext is not None and ext.simd() == "avx512" else None


class _PackedFp32Linear(nn.Module):
    """``y = x @ W.T + b`` over a weight packed once at load (inference only)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features]."""
        if x.dim() != 2:
            return self.forward(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)
        return self._matmul(x)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class PanelLinear(_PackedFp32Linear):
    """W packed in column panels for livelm's GEMM."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernels: ModuleType) -> None:
        super().__init__(weight)
        self._kernels = kernels
        with torch.no_grad():
            self.packed = kernels.fp32_pack(weight.detach())
        self.bias = None if bias is None else bias.detach().float().contiguous()

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self._kernels.fp32_linear(x, self.packed, self.bias, self.out_features)


class PackedLinear(_PackedFp32Linear):
    """W held in oneDNN's packed layout."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__(weight)
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())
        self.bias = None if bias is None else bias.detach().clone()

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")


def packed_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module | None:
    """The fastest packed fp32 linear for this weight: PanelLinear, else PackedLinear (oneDNN),
    or None when neither applies (not fp32 on CPU, no kernels, no oneDNN)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return None
    kernels = panel_kernels() if os.environ.get("LIVELM_DISABLE_PANEL_GEMM") != "1" else None
    if kernels is not None:
        return PanelLinear(weight, bias, kernels)
    if onednn_available(weight):
        return PackedLinear(weight, bias)
    return None


def pack_linear_layers(model: nn.Module) -> int:
    """Swap every plain fp32 CPU ``nn.Linear`` in ``model`` for its packed_linear.

    Other linear types (quantized ones) are left alone. Returns how many were swapped.
    """
    swaps = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                packed = packed_linear(child.weight, child.bias)
                if packed is not None:
                    swaps.append((parent, name, packed))
    for parent, name, packed in swaps:
        setattr(parent, name, packed)
    if swaps:
        logger.info("%s weights for %d linear layers", type(swaps[0][2]).__name__, len(swaps))
    return len(swaps)
