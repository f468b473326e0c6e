"""The sparse feed-forward block of mixture-of-experts models (Qwen2-MoE, Qwen3-MoE,
Mixtral): a router, routed experts stored stacked, and Qwen2-MoE's gated shared expert.

Routed experts' weights are two 2-D parameters, ``experts.gate_up_proj`` [E * 2I, H]
(expert e's gate rows, then its up rows) and ``experts.down_proj`` [E * H, I]: each
checkpoint tensor (``experts.{e}.gate_proj.weight`` ...) is a row range of one of them,
so loading and weight updates use the same (tensor, first row, rows) targets as the
fused dense projections.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from livelm.layers.moe import grouped_experts, route
from livelm.models.model_config import MoEConfig


class Experts(nn.Module):
    """The routed experts of one layer, stacked (see the module docstring for the layout)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts * 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts * hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, H] through each token's experts ``ids`` [T, k], weighted by ``weights``."""
        e, i, h = self.num_experts, self.intermediate_size, self.hidden_size
        return grouped_experts(x, self.gate_up_proj.view(e, 2 * i, h), self.down_proj.view(e, h, i), ids, weights)


class SparseMoeBlock(nn.Module):
    """Router -> top-k experts (grouped by expert), plus a sigmoid-gated shared expert."""

    def __init__(self, hidden_size: int, moe: MoEConfig, shared_expert: nn.Module | None) -> None:
        super().__init__()
        self.moe = moe
        self.gate = nn.Linear(hidden_size, moe.num_experts, bias=False)
        self.experts = Experts(moe.num_experts, hidden_size, moe.intermediate_size)
        self.shared_expert = shared_expert
        self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False) if shared_expert is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> [T, H]."""
        moe = self.moe
        weights, ids = route(self.gate.forward(x), moe.top_k, moe.renormalize, moe.weights_in_model_dtype)
        out = self.experts.forward(x, ids, weights)
        if self.shared_expert is not None:
            gate = F.sigmoid(self.shared_expert_gate.forward(x))
            out = out + gate * self.shared_expert.forward(x)
        return out
