"""The draw: one token per row by inverse CDF, among top candidates or over the whole row.

Rows with top-k, and top-p rows whose nucleus lies within their top ``_TOP_P_CANDIDATES``
logits (the common case for a trained model), are drawn among the candidates one topk
returns: no sort and no pass over the vocabulary after the topk. Every other row (no
top-k/top-p, a flat distribution, logits tied at the top-k edge) is drawn from its whole
row, with top-p found by ``filters._top_p_threshold``. Which way a row goes depends only on
that row (its logits and params), so a seeded row's token never depends on the rest of the
batch.
"""

from __future__ import annotations

import torch

from livelm.runner.sampling.filters import (
    _active_top_k,
    _merge,
    _top_k_threshold,
    _top_p_candidate_threshold,
    _top_p_min_p_threshold,
)
from livelm.runner.sampling.rows import _NEG_INF, _pick, _put_rows, _take_rows
from livelm.sampling_params import SamplingParams

_TOP_P_CANDIDATES = 64


def _sample_rows(
    s: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> torch.Tensor:
    """Filter and draw one token per row of the temperature-scaled logits ``s``."""
    n, vocab = s.shape
    ks = _active_top_k(params, vocab)
    # Rows without top-k need their whole row's softmax: top-p weighs the mass outside the
    # candidates, and a whole-row draw samples from it.
    probs = None if all(ks) else torch.softmax(s, dim=-1)
    cand_rows = [j for j, p in enumerate(params) if ks[j] or p.top_p < 1.0]
    if not cand_rows:
        return _sample_full_rows(s, params, generators, probs=probs)
    c_params, c_ks = _pick(params, cand_rows), _pick(ks, cand_rows)
    c_probs = None if probs is None else _take_rows(probs, cand_rows)
    threshold, fits, vals, ids = _candidate_thresholds(
        _take_rows(s, cand_rows), c_probs, c_params, c_ks
    )
    fit_pos = [i for i, f in enumerate(fits.tolist()) if f]
    fit_rows = _pick(cand_rows, fit_pos)
    tokens = torch.empty(n, dtype=torch.long, device=s.device)
    if fit_rows:
        fit_tokens = _draw_from_candidates(
            _take_rows(vals, fit_pos),
            _take_rows(ids, fit_pos),
            _take_rows(threshold, fit_pos),
            _pick(generators, fit_rows),
        )
        _put_rows(tokens, fit_rows, fit_tokens)
    if len(fit_rows) == n:
        return tokens
    # The rest: rows without top-k / top-p, and candidate rows that did not fit. A top-k row
    # brings its threshold along; a top-p row's is found again over the whole row.
    fitted = set(fit_rows)
    rest = [j for j in range(n) if j not in fitted]
    preset = torch.full((n, 1), _NEG_INF, device=s.device)
    k_pos = [i for i, j in enumerate(cand_rows) if ks[j] and j not in fitted]
    if k_pos:
        _put_rows(preset, _pick(cand_rows, k_pos), _take_rows(threshold, k_pos))
    rest_tokens = _sample_full_rows(
        _take_rows(s, rest),
        _pick(params, rest),
        _pick(generators, rest),
        _take_rows(preset, rest) if k_pos else None,
        None if probs is None else _take_rows(probs, rest),
    )
    _put_rows(tokens, rest, rest_tokens)
    return tokens


def _candidate_thresholds(
    s: torch.Tensor, probs: torch.Tensor | None, params: list[SamplingParams], ks: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thresholds ``[R, 1]`` of rows with top-k or top-p, from their top candidates.

    ``probs`` is the softmax of ``s`` (needed, and only read, when some row has no top-k).
    Returns ``(threshold, fits [R] bool, vals, ids)``: ``vals`` / ``ids`` are the candidates
    (sorted by logit, descending), and ``fits`` says a row's kept set lies among them.
    """
    n, vocab = s.shape
    k_pos = [i for i, k in enumerate(ks) if k]
    p_pos = [i for i, k in enumerate(ks) if not k]
    width = max(_pick(ks, k_pos), default=0) + 1
    if p_pos:
        width = max(width, _TOP_P_CANDIDATES + 1)
    vals, ids = s.topk(min(width, vocab), dim=-1)
    threshold = torch.empty(n, 1, device=s.device)
    fits = torch.empty(n, dtype=torch.bool, device=s.device)
    if k_pos:
        k_vals = _take_rows(vals, k_pos)
        k_list = _pick(ks, k_pos)
        t = _top_k_threshold(k_vals, k_list, _pick(params, k_pos))
        _put_rows(threshold, k_pos, t)
        # All kept tokens are candidates unless the (k+1)-th logit ties the threshold.
        k = torch.tensor(k_list, dtype=torch.long, device=s.device).unsqueeze(1)
        _put_rows(fits, k_pos, (k_vals.gather(1, k) < t).squeeze(1))
    if p_pos:
        # The same number of candidates whatever the batch, so the same result.
        width = min(_TOP_P_CANDIDATES + 1, vocab)
        p_vals = _take_rows(vals, p_pos)[:, :width]
        p_ids = _take_rows(ids, p_pos)[:, :width]
        assert probs is not None
        p_probs = _take_rows(probs, p_pos)
        t = _top_p_candidate_threshold(p_probs, p_vals, p_ids, _pick(params, p_pos))
        _put_rows(threshold, p_pos, t)
        # The last candidate below the threshold: so is every other token.
        p_fits = (p_vals[:, -1:] < t).squeeze(1) | (width == vocab)
        _put_rows(fits, p_pos, p_fits)
    return threshold, fits, vals, ids


def _sample_full_rows(
    s: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    preset: torch.Tensor | None = None,
    probs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw from whole rows; ``preset`` (``[R, 1]``) holds thresholds found already.

    ``probs``, the softmax of ``s`` if the caller has it, is used up (edited in place).
    """
    if probs is None:
        probs = torch.softmax(s, dim=-1)
    threshold = _merge(preset, _top_p_min_p_threshold(s, probs, params))
    if threshold is not None:
        # Multiplying by the bool mask: several times faster on CPU than masked_fill_ or
        # where() with a mask that is not mostly one value.
        probs.mul_(s >= threshold)
    return _draw(probs, generators)


def _draw_from_candidates(
    vals: torch.Tensor,
    ids: torch.Tensor,
    threshold: torch.Tensor,
    generators: list[torch.Generator | None],
) -> torch.Tensor:
    # Candidates in token-id order. Candidates below the threshold get zero mass, so the
    # extra ones a wider batch brings change nothing.
    ids, order = ids.sort(dim=-1)
    vals_by_id = vals.gather(1, order)
    probs = (vals_by_id - vals[:, :1]).exp_().mul_(vals_by_id >= threshold)
    return ids.gather(1, _draw(probs, generators).unsqueeze(1)).squeeze(1)


# A whole-row draw sums the row in chunks of _DRAW_CHUNK, picks a chunk from the chunk
# sums, and only runs a cumulative sum inside that chunk (a full cumsum of [N, V] is the
# slowest step of plain temperature sampling on CPU).
_DRAW_CHUNK = 256


def _draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """Inverse-CDF draw of one position per row of ``probs`` (>= 0, unnormalized).

    With ``t = (1 - u) * total`` in ``(0, total]``, the pick is the first position whose
    cumulative mass reaches ``t``: never a zero-mass position, never past the end.
    """
    n, width = probs.shape
    target = 1.0 - _uniforms(generators, probs.device).unsqueeze(1)
    if width <= 2 * _DRAW_CHUNK:
        cdf = probs.cumsum(dim=-1)
        return torch.searchsorted(cdf, target * cdf[:, -1:]).squeeze(1)
    n_chunks = -(-width // _DRAW_CHUNK)
    if n_chunks * _DRAW_CHUNK != width:
        probs = torch.nn.functional.pad(probs, (0, n_chunks * _DRAW_CHUNK - width))
    chunks = probs.view(n, n_chunks, _DRAW_CHUNK)
    chunk_cdf = chunks.sum(dim=-1).cumsum(dim=-1)
    target = target * chunk_cdf[:, -1:]
    # The first chunk whose cumulative mass reaches t: it has mass, and the mass before it
    # is < t, so t - before > 0.
    chunk = torch.searchsorted(chunk_cdf, target).clamp_(max=n_chunks - 1)
    before = torch.where(chunk > 0, chunk_cdf.gather(1, (chunk - 1).clamp_(min=0)), 0.0)
    index = chunk.unsqueeze(2).expand(n, 1, _DRAW_CHUNK)
    inner_cdf = chunks.gather(1, index).squeeze(1).cumsum(dim=-1)
    # The chunk's sum and its sequential cumsum may round differently: clamp so the pick
    # stays inside the chunk, on its last token that has mass at worst.
    inner_target = torch.minimum(target - before, inner_cdf[:, -1:])
    pos = torch.searchsorted(inner_cdf, inner_target)
    return (chunk * _DRAW_CHUNK + pos).squeeze(1)


def _uniforms(generators: list[torch.Generator | None], device: torch.device) -> torch.Tensor:
    """One U[0, 1) number per row: a seeded row's comes from its own generator only."""
    n = len(generators)
    if any(g is None for g in generators):
        u = torch.rand(n, device=device)
    else:
        u = torch.empty(n, device=device)
    for j, g in enumerate(generators):
        if g is not None:
            u[j : j + 1].uniform_(generator=g)
    return u
