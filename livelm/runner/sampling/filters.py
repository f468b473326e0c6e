"""Temperature and the top-k / top-p / min-p filters, each as a per-row logit threshold.

Every filter becomes a per-row logit threshold: a token is kept when its logit is >= its
row's threshold. Filters in Hugging Face's order: top-k, then top-p over what top-k kept
(renormalized), then min-p (relative to the top token, which the others always keep).
"""

from __future__ import annotations

import math

import torch

from livelm.runner.sampling.rows import _NEG_INF, _pick, _put_rows, _take_rows
from livelm.sampling_params import SamplingParams


def _scale_by_temperature(x: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    temps = [p.temperature for p in params]
    if all(t == 1.0 for t in temps):
        return x
    # Divide (as Hugging Face does) rather than multiply by 1/T: exact per element, so a
    # row's scaled logits never depend on the rest of the batch.
    return x / torch.tensor(temps, dtype=torch.float32, device=x.device).unsqueeze(1)


def _active_top_k(params: list[SamplingParams], vocab: int) -> list[int]:
    """Each row's top-k, 0 where off (a k covering the whole vocabulary is off too)."""
    return [p.top_k if 0 < p.top_k < vocab else 0 for p in params]


def _filter_threshold(s: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor | None:
    """Per-row threshold ``[R, 1]`` of all filters (None: no filter), as a whole-row draw
    applies them."""
    n, vocab = s.shape
    ks = _active_top_k(params, vocab)
    k_rows = [j for j, k in enumerate(ks) if k]
    preset = None
    if k_rows:
        vals = _take_rows(s, k_rows).topk(max(ks) + 1, dim=-1).values
        preset = torch.full((n, 1), _NEG_INF, device=s.device)
        _put_rows(preset, k_rows, _top_k_threshold(vals, _pick(ks, k_rows), _pick(params, k_rows)))
    return _merge(preset, _top_p_min_p_threshold(s, torch.softmax(s, dim=-1), params))


def _merge(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else torch.maximum(a, b)


def _suffix_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of each element and everything after it along the last dim.

    Summing from the small end keeps full precision for the tail masses top-p compares
    against ``1 - p`` (a prefix sum near the total cannot resolve ``1 - p`` near 1).
    """
    return x.flip(-1).cumsum(dim=-1).flip(-1)


def _tail_bound(params: list[SamplingParams], device: torch.device) -> torch.Tensor:
    """``1 - top_p`` per row ``[R, 1]``; -1 where top-p is off, which keeps everything."""
    bounds = [1.0 - p.top_p if p.top_p < 1.0 else -1.0 for p in params]
    return torch.tensor(bounds, dtype=torch.float32, device=device).unsqueeze(1)


def _min_p_threshold(row_max: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor | None:
    """min-p as a threshold: prob >= min_p * max_prob  <=>  logit >= max_logit + log(min_p)."""
    if all(p.min_p == 0.0 for p in params):
        return None
    # math.log on the host: the same bits whatever else is in the batch.
    logs = [math.log(p.min_p) if p.min_p > 0.0 else _NEG_INF for p in params]
    return row_max + torch.tensor(logs, dtype=torch.float32, device=row_max.device).unsqueeze(1)


def _top_k_threshold(
    vals: torch.Tensor, ks: list[int], params: list[SamplingParams]
) -> torch.Tensor:
    """Threshold of top-k, then top-p and min-p, from the sorted top candidates ``vals``."""
    keep = torch.tensor(ks, dtype=torch.long, device=vals.device).unsqueeze(1)
    if any(p.top_p < 1.0 for p in params):
        # Top-p over the renormalized top-k set, as Hugging Face: a sorted token is dropped
        # when the mass of it and everything below it is <= 1 - p.
        positions = torch.arange(vals.shape[1], device=vals.device)
        probs = (vals - vals[:, :1]).exp_().mul_(positions < keep)
        bound = _tail_bound(params, vals.device) * probs.sum(dim=-1, keepdim=True)
        n_keep = (_suffix_sum(probs) > bound).sum(dim=-1, keepdim=True).clamp_(min=1)
        keep = torch.minimum(keep, n_keep)
    threshold = vals.gather(1, keep - 1)
    min_p = _min_p_threshold(vals[:, :1], params)
    return threshold if min_p is None else torch.maximum(threshold, min_p)


def _top_p_candidate_threshold(
    probs: torch.Tensor, vals: torch.Tensor, ids: torch.Tensor, params: list[SamplingParams]
) -> torch.Tensor:
    """Top-p (and min-p) threshold of rows without top-k, from their top candidates.

    Right when the nucleus lies among the candidates (the caller checks that): the mass
    outside the candidates is then part of every candidate's tail. ``probs`` (the rows'
    softmax) is only read.
    """
    cand = probs.gather(1, ids)
    # Summed outright rather than as 1 - sum(cand): that keeps its precision when small.
    outside = probs.scatter(1, ids, 0.0).sum(dim=-1, keepdim=True)
    bound = _tail_bound(params, probs.device) * (outside + cand.sum(dim=-1, keepdim=True))
    n_keep = (outside + _suffix_sum(cand) > bound).sum(dim=-1, keepdim=True).clamp_(min=1)
    threshold = vals.gather(1, n_keep - 1)
    min_p = _min_p_threshold(vals[:, :1], params)
    return threshold if min_p is None else torch.maximum(threshold, min_p)


def _top_p_min_p_threshold(
    s: torch.Tensor, probs: torch.Tensor, params: list[SamplingParams]
) -> torch.Tensor | None:
    """Whole-row threshold ``[R, 1]`` of top-p (rows without top-k) and min-p, or None."""
    n, vocab = s.shape
    ks = _active_top_k(params, vocab)
    p_rows = [j for j, p in enumerate(params) if not ks[j] and p.top_p < 1.0]
    row_max = s.amax(dim=-1, keepdim=True)
    threshold = None
    if p_rows:
        threshold = torch.full((n, 1), _NEG_INF, device=s.device)
        t = _top_p_threshold(
            _take_rows(s, p_rows),
            _take_rows(row_max, p_rows),
            _take_rows(probs, p_rows),
            _pick(params, p_rows),
        )
        _put_rows(threshold, p_rows, t)
    return _merge(threshold, _min_p_threshold(row_max, params))


# Top-p without sorting the vocabulary: tokens are binned by how far their logit lies below
# the row max (1/_BUCKETS_PER_LOGIT of a logit per bin, _NUM_BUCKETS bins, the last bin also
# holding everything further down, i.e. ~e^-32 less likely than the top token). The bin
# holding the nucleus edge is found from the binned masses; only that bin is sorted.
_BUCKETS_PER_LOGIT = 128
_NUM_BUCKETS = 4096


def _top_p_threshold(
    s: torch.Tensor, row_max: torch.Tensor, probs: torch.Tensor, params: list[SamplingParams]
) -> torch.Tensor:
    """Nucleus threshold of whole rows (top-p < 1, no top-k) without a full sort.

    The result a sort would give: the smallest logit whose token, together with every token
    below it, holds more than ``1 - p`` of the mass (``probs`` holds the row's softmax).
    """
    bound = _tail_bound(params, s.device) * probs.sum(dim=-1, keepdim=True)
    # Distance below the max, in bins; -inf logits land in the last bin. .long() truncates,
    # which is floor here since the distance is >= 0.
    bins = (row_max - s).mul_(_BUCKETS_PER_LOGIT).clamp_(max=_NUM_BUCKETS - 1).long()
    bin_mass = torch.zeros(s.shape[0], _NUM_BUCKETS, device=s.device).scatter_add_(1, bins, probs)
    # bin_tail[b]: mass of bin b and all bins below it, non-increasing in b. Bins before the
    # last one whose tail exceeds the bound are kept whole, bins after it dropped whole; the
    # cut falls inside that edge bin. (Clamped to bin 0 when even the total is not above the
    # bound, which only a tiny p can cause: then only the top token stays.)
    bin_tail = _suffix_sum(bin_mass)
    edge = ((bin_tail > bound).sum(dim=-1, keepdim=True) - 1).clamp_(min=0)
    below = bin_tail.gather(1, (edge + 1).clamp_(max=_NUM_BUCKETS - 1))
    below = torch.where(edge + 1 < _NUM_BUCKETS, below, 0.0)  # mass under the edge bin
    # The edge bin's tokens, each row's sorted by logit (descending), packed into [R, width]
    # (nonzero + two small sorts: cheaper than a topk over the vocabulary).
    rows, cols = (bins == edge).nonzero(as_tuple=True)
    edge_vals = s[rows, cols]
    order = torch.argsort(edge_vals, descending=True, stable=True)
    order = order[torch.argsort(rows[order], stable=True)]
    rows, cols, edge_vals = rows[order], cols[order], edge_vals[order]
    n_edge = torch.bincount(rows, minlength=s.shape[0]).unsqueeze(1)  # >= 1 per row
    first = (n_edge.cumsum(0) - n_edge).squeeze(1)
    pos = torch.arange(rows.numel(), device=s.device) - first[rows]
    width = int(n_edge.max())
    vals = torch.full((s.shape[0], width), _NEG_INF, device=s.device)
    vals[rows, pos] = edge_vals
    edge_probs = torch.zeros(s.shape[0], width, device=s.device)
    edge_probs[rows, pos] = probs[rows, cols]
    n_keep = (below + _suffix_sum(edge_probs) > bound).sum(dim=-1, keepdim=True).clamp_(min=1)
    return vals.gather(1, torch.minimum(n_keep, n_edge) - 1)
