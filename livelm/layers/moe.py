"""Mixture-of-experts compute: top-k routing and the expert-grouped feed-forward.

The grouped path never loops over tokens in Python: the batch's (token, expert) pairs are
sorted by expert, each active expert runs one matmul over all its rows, and the weighted
results are added back into their tokens with one ``index_add_``. The loop is over the
experts a step reaches (at most ``num_experts`` per layer), not over tokens.
``gathered_experts`` (gather each pair's weights, one bmm) is the alternative; which is
faster has not been measured yet.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from livelm.layers.fused_ops import silu_and_mul


def route(
    logits: torch.Tensor, top_k: int, renormalize: bool, weights_in_model_dtype: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k], expert ids [T, k]) from router logits [T, E], as transformers routes:
    softmax in fp32 over all experts, the top k, optionally renormalised to sum to 1.

    ``weights_in_model_dtype``: Qwen2-MoE / Qwen3-MoE cast the weights back to the model's
    dtype before scaling expert outputs; Mixtral keeps them fp32.
    """
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if weights_in_model_dtype:
        weights = weights.to(logits.dtype)
    return weights, ids


def grouped_experts(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """Sum over each token's chosen experts of ``weight * down(silu(gate) * up)``.

    x [T, H]; gate_up [E, 2I, H] (gate rows first); down [E, H, I]; ids, weights [T, k].
    """
    t, k = ids.shape
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # pair order, grouped by expert
    counts = torch.bincount(flat, minlength=gate_up.shape[0]).tolist()  # one host sync
    token = order // k
    rows = x.index_select(0, token)
    out = torch.empty_like(rows)
    start = 0
    for expert, n in enumerate(counts):
        if n:
            end = start + n
            h = silu_and_mul(F.linear(rows[start:end], gate_up[expert]))
            torch.mm(h, down[expert].t(), out=out[start:end])
            start = end
    out = out * weights.reshape(-1)[order].unsqueeze(1)
    result = torch.zeros_like(x)
    result.index_add_(0, token, out.to(x.dtype))
    return result


def gathered_experts(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """The same sum by gathering every pair's expert weights and one batched matmul
    (no Python loop at all, but a copy of k experts' weights per token). Kept as the
    benchmark's comparison arm and as a reference in tests."""
    t, k = ids.shape
    flat = ids.reshape(-1)
    rows = x.repeat_interleave(k, dim=0).unsqueeze(1)  # [T*k, 1, H]
    h = torch.bmm(rows, gate_up[flat].transpose(1, 2)).squeeze(1)
    h = silu_and_mul(h).unsqueeze(1)
    out = torch.bmm(h, down[flat].transpose(1, 2)).squeeze(1)
    out = (out * weights.reshape(-1, 1)).view(t, k, -1)
    return out.sum(dim=1).to(x.dtype)
