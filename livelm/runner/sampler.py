"""Batch sampler: penalties, temperature, top-k / top-p / min-p filters, the draw, logprobs.

One call per step turns the logits of every row that needs a new token into token ids.
All per-row settings become small per-row tensors, so the work on the ``[N, V]`` logits is
batched; Python loops over rows only build index tensors and draw the seeded rows' numbers.

Choices (where vLLM and Hugging Face differ, or neither says):

- Logprobs, ranks and top-K alternatives come from the raw logits (before penalties,
  temperature and filters), as in vLLM's default and the OpenAI API.
- Repetition penalty follows Hugging Face (prompt + output tokens; ``l / p`` if ``l > 0``
  else ``l * p``); presence / frequency penalties follow OpenAI (output tokens only).
  Repetition is applied first, then presence / frequency (vLLM's order).
- Filters apply in Hugging Face's order: temperature -> top-k -> top-p -> min-p. Each filter
  becomes a per-row logit threshold (keep ``logit >= threshold``), so tokens tied with the
  last kept one are kept too: as Hugging Face's top-k, while its top-p cuts a tie group at
  an arbitrary point. Without ties the kept sets are Hugging Face's exactly.
- The draw is by inverse CDF with one uniform number per row (the first token whose
  cumulative probability reaches ``u``). On CPU this is far cheaper than an exponential race
  (which draws ``V`` exponentials per row), and a seeded request spends one number of its
  generator per step. No full sort either: top-k and most top-p rows draw among the
  candidates of one ``topk``; top-p over a flat distribution uses a histogram.
- A seeded row's token depends only on its logits, params and generator: every per-row
  decision (which path, which threshold) is made from that row alone. On CUDA, float
  atomics in the top-p histogram may still flip a cut that falls exactly on a rounding
  boundary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import torch

from livelm.sampling_params import SamplingParams

_NEG_INF = float("-inf")


@dataclass
class SamplingBatch:
    """Per-step sampling inputs, built by the model runner: row ``i`` is one sequence.

    ``eos_token_ids[i]`` and the row's ``stop_token_ids`` are suppressed while the row has
    fewer than ``min_tokens`` output tokens (the runner passes an empty set for
    ``ignore_eos`` requests). ``generators[i]`` is the request's own generator (on the
    logits' device) when it has a seed, else ``None``.
    """

    params: list[SamplingParams]
    prompt_token_ids: list[list[int]]
    output_token_ids: list[list[int]]
    generators: list[torch.Generator | None]
    eos_token_ids: list[set[int]]


@dataclass
class SamplerOutput:
    """Sampled tokens of one step and, when any row asked, their raw-distribution logprobs.

    The logprob tensors are ``None`` when no row asked (``params.logprobs is None`` on every
    row); ``top_ids`` / ``top_logprobs`` are also ``None`` when the largest ``logprobs`` asked
    is 0. ``K`` is the largest ``logprobs`` over the rows; a row that asked for fewer reads
    its first ``params.logprobs`` columns. Rows that did not ask hold filler: NaN logprob,
    rank 0, top id -1, top logprob NaN.
    """

    token_ids: torch.Tensor  # [N] int64
    logprobs: torch.Tensor | None = None  # [N] float32, log-softmax of raw logits at the token
    ranks: torch.Tensor | None = None  # [N] int64, 1-based rank of the token in raw logits
    top_ids: torch.Tensor | None = None  # [N, K] int64
    top_logprobs: torch.Tensor | None = None  # [N, K] float32


class Sampler:
    """Picks one token per row of a logits batch according to each row's SamplingParams.

    Stateless: per-request state (generated tokens, seeded generators) arrives in the
    :class:`SamplingBatch`, so one instance serves the whole engine.
    """

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """Sample a token for each row of ``logits`` ``[N, V]`` (any float dtype, any device).

        The caller's ``logits`` tensor is never modified.
        """
        if logits.shape[0] == 0:
            return SamplerOutput(torch.empty(0, dtype=torch.long, device=logits.device))
        # The throughput hot path: plain greedy rows need nothing but an argmax.
        if all(
            p.greedy
            and p.repetition_penalty == 1.0
            and p.presence_penalty == 0.0
            and p.frequency_penalty == 0.0
            and p.min_tokens <= len(out)
            for p, out in zip(batch.params, batch.output_token_ids, strict=True)
        ):
            token_ids = logits.argmax(dim=-1)
        else:
            token_ids = self._sample(logits, batch)
        return _attach_logprobs(logits, token_ids, batch.params)

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        n = logits.shape[0]
        params = batch.params
        x = apply_penalties(logits, batch)
        greedy_rows = [i for i, p in enumerate(params) if p.greedy]
        if len(greedy_rows) == n:
            return x.argmax(dim=-1)
        if not greedy_rows:
            return _sample_rows(_scale_by_temperature(x, params), params, batch.generators)

        token_ids = torch.empty(n, dtype=torch.long, device=logits.device)
        _put_rows(token_ids, greedy_rows, _take_rows(x, greedy_rows).argmax(dim=-1))
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        rparams = [params[i] for i in random_rows]
        s = _scale_by_temperature(_take_rows(x, random_rows), rparams)
        sampled = _sample_rows(s, rparams, [batch.generators[i] for i in random_rows])
        _put_rows(token_ids, random_rows, sampled)
        return token_ids


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Return fp32 logits with min_tokens suppression and the three penalties applied.

    Returns ``logits`` itself (as fp32, possibly a dtype-converted copy) when no row has an
    active penalty or suppression; otherwise a fresh contiguous fp32 copy.
    """
    suppress_rows: list[int] = []
    rep_rows: list[int] = []
    pf_rows: list[int] = []
    for i, (p, out) in enumerate(zip(batch.params, batch.output_token_ids, strict=True)):
        if len(out) < p.min_tokens:
            suppress_rows.append(i)
        if p.repetition_penalty != 1.0:
            rep_rows.append(i)
        if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
            pf_rows.append(i)
    if not (suppress_rows or rep_rows or pf_rows):
        return logits.float()
    x = logits.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    if suppress_rows:
        _suppress_stop_tokens(x, suppress_rows, batch)
    if rep_rows:
        _apply_repetition_penalty(x, rep_rows, batch)
    if pf_rows:
        _apply_presence_frequency_penalties(x, pf_rows, batch)
    return x


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


# --------------------------------------------------------------------------- helpers


def _index(rows: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


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


def _flat_positions(
    owners: list[int], token_lists: list[list[int]], vocab: int, device: torch.device
) -> torch.Tensor:
    """Indices into ``x.view(-1)`` of every (owner row, token) pair, in-vocabulary only."""
    toks = torch.tensor(list(chain.from_iterable(token_lists)), dtype=torch.long)
    rows = torch.repeat_interleave(
        torch.tensor(owners, dtype=torch.long),
        torch.tensor([len(t) for t in token_lists], dtype=torch.long),
    )
    # Ids the logits do not cover (e.g. tokens added past the model's vocab) can't be penalized.
    in_vocab = toks < vocab
    return (rows[in_vocab] * vocab + toks[in_vocab]).to(device)


def _suppress_stop_tokens(x: torch.Tensor, rows: list[int], batch: SamplingBatch) -> None:
    vocab = x.shape[1]
    owners: list[int] = []
    lists: list[list[int]] = []
    for i in rows:
        owners.append(i)
        lists.append([*batch.eos_token_ids[i], *batch.params[i].stop_token_ids])
    pos = _flat_positions(owners, lists, vocab, x.device)
    if pos.numel():
        x.view(-1)[pos] = _NEG_INF


def _apply_repetition_penalty(x: torch.Tensor, rows: list[int], batch: SamplingBatch) -> None:
    n, vocab = x.shape
    owners: list[int] = []
    lists: list[list[int]] = []
    for i in rows:
        owners += [i, i]
        lists += [batch.prompt_token_ids[i], batch.output_token_ids[i]]
    pos = _flat_positions(owners, lists, vocab, x.device)
    if not pos.numel():
        return
    penalty = torch.ones(n, dtype=torch.float32)
    penalty[rows] = torch.tensor([batch.params[i].repetition_penalty for i in rows])
    penalty = penalty.to(x.device)[pos // vocab]
    flat = x.view(-1)
    vals = flat[pos]
    # A token seen several times appears several times in pos; every copy writes the same
    # value (computed from the unpenalized logit), so it is penalized exactly once.
    flat[pos] = torch.where(vals > 0, vals / penalty, vals * penalty)


def _apply_presence_frequency_penalties(
    x: torch.Tensor, rows: list[int], batch: SamplingBatch
) -> None:
    n, vocab = x.shape
    pos = _flat_positions(rows, [batch.output_token_ids[i] for i in rows], vocab, x.device)
    if not pos.numel():
        return
    # Exact integer counts (not a float scatter-add, whose order on CUDA is not fixed).
    uniq, counts = torch.unique(pos, return_counts=True)
    presence = torch.zeros(n, dtype=torch.float32)
    frequency = torch.zeros(n, dtype=torch.float32)
    presence[rows] = torch.tensor([batch.params[i].presence_penalty for i in rows])
    frequency[rows] = torch.tensor([batch.params[i].frequency_penalty for i in rows])
    owner = uniq // vocab
    delta = frequency.to(x.device)[owner] * counts + presence.to(x.device)[owner]
    x.view(-1).index_add_(0, uniq, -delta)


def _scale_by_temperature(x: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    temps = [p.temperature for p in params]
    if all(t == 1.0 for t in temps):
        return x
    # Divide (as Hugging Face does) rather than multiply by 1/T: exact per element, so a
    # row's scaled logits never depend on the rest of the batch.
    return x / torch.tensor(temps, dtype=torch.float32, device=x.device).unsqueeze(1)


def _take_rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    if len(rows) == x.shape[0]:
        return x
    return x.index_select(0, _index(rows, x.device))


def _put_rows(dst: torch.Tensor, rows: list[int], src: torch.Tensor) -> None:
    if len(rows) == dst.shape[0]:
        dst.copy_(src)
    else:
        dst.index_copy_(0, _index(rows, dst.device), src)


def _pick(items: list, rows: list[int]) -> list:
    return [items[j] for j in rows]


# ------------------------------------------------------------------------ the draw
#
# Rows with top-k, and top-p rows whose nucleus lies within their top _TOP_P_CANDIDATES
# logits (the common case for a trained model), are drawn among the candidates one topk
# returns: no sort and no pass over the vocabulary after the topk. Every other row (no
# top-k/top-p, a flat distribution, logits tied at the top-k edge) is drawn from its whole
# row, with top-p found by _top_p_threshold. Which way a row goes depends only on that row
# (its logits and params), so a seeded row's token never depends on the rest of the batch.

_TOP_P_CANDIDATES = 64


def _active_top_k(params: list[SamplingParams], vocab: int) -> list[int]:
    """Each row's top-k, 0 where off (a k covering the whole vocabulary is off too)."""
    return [p.top_k if 0 < p.top_k < vocab else 0 for p in params]


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


# --------------------------------------------------------------------- thresholds
#
# Every filter becomes a per-row logit threshold: a token is kept when its logit is >= its
# row's threshold. Filters in Hugging Face's order: top-k, then top-p over what top-k kept
# (renormalized), then min-p (relative to the top token, which the others always keep).


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
