"""fp32 linear layers on CPU through oneDNN with pre-packed weights.

torch's ``F.linear`` on CPU calls MKL, which runs its AVX2 code on AMD CPUs: on the
AVX-512 EPYC these benchmarks run on it reaches ~190 GFLOP/s on two cores, where oneDNN
(bundled with torch, used by ``torch.ops.mkldnn``) reaches ~440 GFLOP/s on the same
shapes, at M=64 (a decode step) as at M=2048 (a prefill chunk). The weights are reordered
once into oneDNN's blocked layout, so no call pays for a reorder.

The results are fp32 sums like MKL's, only in another order (differences ~1e-6 relative).
``LIVELM_DISABLE_ONEDNN=1`` keeps plain ``F.linear``.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

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


class PackedLinear(nn.Module):
    """``y = x @ W.T + b`` with W held in oneDNN's packed layout (inference only)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())
        self.bias = None if bias is None else bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features]."""
        if x.dim() != 2:
            return self.forward(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linear_layers(model: nn.Module) -> int:
    """Swap every plain fp32 CPU ``nn.Linear`` in ``model`` for a PackedLinear.

    Other linear types (quantized ones) are left alone. Returns how many were swapped.
    """
    swaps = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Linear and onednn_available(child.weight):
                swaps.append((parent, name, child))
    for parent, name, child in swaps:
        setattr(parent, name, PackedLinear(child.weight, child.bias))
    if swaps:
        logger.info("oneDNN packed weights for %d linear layers", len(swaps))
    return len(swaps)
