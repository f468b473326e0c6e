"""Log-probabilities of sampled tokens under the distribution they were drawn from (RL).

A trainer computing importance weights needs ``log pi_old(token)`` of the distribution the
engine actually sampled from, not the raw model's (``logprobs``). For a row with
``SamplingParams.sampling_logprobs`` this is, exactly in the sampler's order:

1. the raw fp32 logits, a structured-output mask applied (disallowed tokens at -inf);
2. min_tokens suppression and the repetition / presence / frequency penalties;
3. divided by ``temperature``;
4. the top-k / top-p / min-p filters as the draw applies them (tokens below the row's
   threshold at -inf, ``filters._filter_threshold``);
5. log-softmax over the vocabulary, read at the sampled token.

A greedy row (``temperature == 0``) draws its argmax with probability one: its sampling
logprob is 0.0. Computed only for the rows that ask, after the draw, from the same tensors.
"""

from __future__ import annotations

import math

import torch

from livelm.runner.sampling.batch import SamplingBatch
from livelm.runner.sampling.filters import _filter_threshold, _scale_by_temperature
from livelm.runner.sampling.penalties import apply_penalties
from livelm.runner.sampling.rows import _NEG_INF, _index


def compute_sampling_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """``[N]`` sampling log-probabilities (NaN for rows that did not ask); ``logits`` are the
    step's logits with any token mask already applied."""
    params = batch.params
    n = logits.shape[0]
    out = torch.full((n,), math.nan, dtype=torch.float32, device=logits.device)
    rows = [i for i, p in enumerate(params) if p.sampling_logprobs and not p.greedy]
    for i, p in enumerate(params):
        if p.sampling_logprobs and p.greedy:
            out[i] = 0.0
    if not rows:
        return out
    x = apply_penalties(logits, batch)
    idx = _index(rows, logits.device)
    rparams = [params[i] for i in rows]
    s = _scale_by_temperature(x.index_select(0, idx), rparams)
    threshold = _filter_threshold(s, rparams)
    if threshold is not None:
        s = s.masked_fill(s < threshold, _NEG_INF)
    lp = torch.log_softmax(s, dim=-1)
    out.index_copy_(0, idx, lp.gather(1, token_ids.index_select(0, idx).unsqueeze(1)).squeeze(1))
    return out
