"""Logprobs, ranks and top-K alternatives of the sampled tokens, from the raw logits."""

from __future__ import annotations

import math

import torch

from livelm.runner.sampling.batch import SamplerOutput
from livelm.runner.sampling.rows import _index
from livelm.sampling_params import SamplingParams


def compute_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, num_top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Log-softmax of ``logits`` ``[N, V]`` at ``token_ids`` ``[N]``, with ranks and top-K.

    Returns ``(logprobs [N], ranks [N] (1-based; ties share the best rank), top_logprobs
    [N, num_top] or None, top_ids [N, num_top] or None)``. Also usable for prompt logprobs.
    """
    lp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
    tok_lp = lp.gather(1, token_ids.unsqueeze(1))
    # Count in int32 (a bool sum in int64 costs a widening pass over [N, V]).
    ranks = (lp > tok_lp).sum(dim=-1, dtype=torch.int32).long() + 1
    if num_top <= 0:
        return tok_lp.squeeze(1), ranks, None, None
    top_lp, top_ids = lp.topk(num_top, dim=-1)
    return tok_lp.squeeze(1), ranks, top_lp, top_ids


def _attach_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, params: list[SamplingParams]
) -> SamplerOutput:
    want = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not want:
        return SamplerOutput(token_ids)
    num_top = max(params[i].logprobs for i in want)
    n = logits.shape[0]
    if len(want) == n:
        lp, ranks, top_lp, top_ids = compute_logprobs(logits, token_ids, num_top)
        return SamplerOutput(token_ids, lp, ranks, top_ids, top_lp)
    # Only some rows asked: the log-softmax costs a pass over [rows, V], so skip the others.
    idx = _index(want, logits.device)
    lp_s, ranks_s, top_lp_s, top_ids_s = compute_logprobs(
        logits.index_select(0, idx), token_ids.index_select(0, idx), num_top
    )
    lp = lp_s.new_full((n,), math.nan).index_copy_(0, idx, lp_s)
    ranks = ranks_s.new_zeros(n).index_copy_(0, idx, ranks_s)
    top_ids = top_lp = None
    if top_lp_s is not None and top_ids_s is not None:
        top_lp = top_lp_s.new_full((n, num_top), math.nan).index_copy_(0, idx, top_lp_s)
        top_ids = top_ids_s.new_full((n, num_top), -1).index_copy_(0, idx, top_ids_s)
    return SamplerOutput(token_ids, lp, ranks, top_ids, top_lp)
