"""Batch sampler: penalties, temperature, top-k / top-p / min-p filters, the draw, logprobs.

One call per step turns the logits of every row that needs a new token into token ids.
All per-row settings become small per-row tensors, so the work on the ``[N, V]`` logits is
batched; Python loops over rows only build index tensors and draw the seeded rows' numbers.

Choices (where vLLM and Hugging Face differ, or neither says):

- Logprobs, ranks and top-K alternatives come from the raw logits (before penalties,
  temperature and filters), as in vLLM's default and the OpenAI API. For a row under a
  structured-output constraint too: the grammar's mask decides which token is drawn, the
  logprobs say how likely the model found it (so a forced token can have a low logprob,
  and the top-K alternatives can be tokens the grammar refused).
- A constrained row's disallowed tokens are set to -inf before anything else (penalties,
  temperature, filters, greedy), on a copy: unconstrained rows are untouched, so their
  tokens are those of a batch without constraints, and a batch without constraints costs
  nothing more.
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

import torch

from livelm.runner.sampling.batch import SamplerOutput, SamplingBatch
from livelm.runner.sampling.draw import _sample_rows
from livelm.runner.sampling.filters import _scale_by_temperature
from livelm.runner.sampling.guard import check_finite_rows
from livelm.runner.sampling.logprobs import _attach_logprobs
from livelm.runner.sampling.penalties import apply_penalties
from livelm.runner.sampling.rows import _put_rows, _take_rows
from livelm.runner.sampling.sampling_logprobs import compute_sampling_logprobs
from livelm.runner.sampling.token_mask import apply_token_mask


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
        raw = logits
        if batch.token_mask is not None:
            logits = apply_token_mask(logits, batch.token_mask)  # a copy: raw stays as it was
        # The throughput hot path: plain greedy rows need nothing but an argmax.
        if all(
            p.greedy
            and p.repetition_penalty == 1.0
            and p.presence_penalty == 0.0
            and p.frequency_penalty == 0.0
            and p.min_tokens <= len(out)
            for p, out in zip(batch.params, batch.output_token_ids, strict=True)
        ):
            top, token_ids = logits.max(dim=-1)  # one pass, as argmax: the max is the guard's
            check_finite_rows((top, None))
        else:
            token_ids = self._sample(logits, batch)
        out = _attach_logprobs(raw, token_ids, batch.params)
        if any(p.sampling_logprobs for p in batch.params):
            out.sampling_logprobs = compute_sampling_logprobs(logits, token_ids, batch)
        return out

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        n = logits.shape[0]
        params = batch.params
        x = apply_penalties(logits, batch)
        greedy_rows = [i for i, p in enumerate(params) if p.greedy]
        if len(greedy_rows) == n:
            top, token_ids = x.max(dim=-1)
            check_finite_rows((top, None))
            return token_ids
        if not greedy_rows:
            s = _scale_by_temperature(x, params)
            check_finite_rows((s.amax(dim=-1), None))  # before any row is drawn
            return _sample_rows(s, params, batch.generators)

        token_ids = torch.empty(n, dtype=torch.long, device=logits.device)
        greedy_top, greedy_ids = _take_rows(x, greedy_rows).max(dim=-1)
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        rparams = [params[i] for i in random_rows]
        s = _scale_by_temperature(_take_rows(x, random_rows), rparams)
        check_finite_rows((greedy_top, greedy_rows), (s.amax(dim=-1), random_rows))
        _put_rows(token_ids, greedy_rows, greedy_ids)
        sampled = _sample_rows(s, rparams, [batch.generators[i] for i in random_rows])
        _put_rows(token_ids, random_rows, sampled)
        return token_ids
