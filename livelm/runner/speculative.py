"""Verification of drafted tokens: which of them the target model accepts, and the token
that follows them, from the logits at every drafted position of one forward pass.

A chunk with ``k`` drafted tokens has ``k + 1`` rows of logits: row ``j`` follows the
request's tokens plus the first ``j`` drafts, and the sampler processes it exactly as it
would that row in plain decoding (penalties see those drafts as output, min_tokens counts
them, top-k / top-p / min-p and temperature shape the target distribution ``p_j``,
logprobs come from the raw row). Row ``j`` draws its token ``y_j``; drafts are accepted
while ``y_j`` equals them, and the first ``y_j`` that differs (or ``y_k`` when every
draft held) follows them.

- Greedy rows: ``y_j`` is the target's argmax, so the output is plain decoding's.
- Sampled rows: this *is* standard speculative rejection sampling (Leviathan et al.,
  Chen et al.) for a drafter that proposes its token ``d_j`` with certainty (``q_j`` one
  hot, as n-gram and suffix drafts are): that scheme accepts ``d_j`` with probability
  ``min(1, p_j(d_j) / q_j(d_j)) = p_j(d_j)`` and on rejection draws from
  ``max(0, p_j - q_j)`` renormalized, ``p_j`` without ``d_j``. Drawing ``y_j ~ p_j`` and
  accepting iff ``y_j == d_j`` realizes exactly that law. Each row draws with the number
  plain decoding would have used at that position (row ``j`` gets a generator standing
  where the request's own stands after ``j`` numbers), and the request's generator is
  then set to where plain decoding leaves it (one number per emitted token), so a
  seeded request's tokens are plain decoding's too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from livelm.core.scheduler_output import SampledToken, ScheduledChunk
from livelm.runner.sampling.batch import SamplerOutput, SamplingBatch
from livelm.runner.sampling.guard import NonFiniteLogits, RowFailure
from livelm.runner.sampling.rows import _index
from livelm.runner.sampling.sampler import Sampler


@dataclass(frozen=True)
class DraftRows:
    """One chunk with drafts: its rows ``first .. first + k`` of the logits, its generator."""

    chunk: ScheduledChunk
    first: int
    generator: torch.Generator | None

    @property
    def rows(self) -> range:
        """Its rows in the logits."""
        return range(self.first, self.first + len(self.chunk.draft_token_ids) + 1)


def expanded_batch(
    drafts: list[DraftRows], eos_token_ids: set[int], generators: list[torch.Generator | None]
) -> SamplingBatch:
    """The sampling batch of every drafted position: row ``j`` of a chunk has its
    request's outputs followed by the chunk's first ``j`` drafts; ``generators`` has one
    entry per row."""
    params, prompts, outputs, eos = [], [], [], []
    for d in drafts:
        c = d.chunk
        stop_ids = set() if c.sampling_params.ignore_eos else eos_token_ids
        for j in range(len(c.draft_token_ids) + 1):
            params.append(c.sampling_params)
            prompts.append(c.prompt_token_ids)
            outputs.append(list(c.output_token_ids) + list(c.draft_token_ids[:j]))
            eos.append(stop_ids)
    return SamplingBatch(params, prompts, outputs, generators, eos)


def _row_generators(gen: torch.Generator | None, num_rows: int) -> tuple[list, list]:
    """Generators for ``num_rows`` consecutive positions of one request: row ``j``'s starts
    where ``gen`` stands after ``j`` numbers (the sampler may draw rows in any order).
    Returns them and the ``num_rows + 1`` states of ``gen`` after 0 .. num_rows numbers."""
    if gen is None:
        return [None] * num_rows, []
    states = [gen.get_state()]
    rows = []
    one = torch.empty(1, device=gen.device)
    for _ in range(num_rows):
        g = torch.Generator(device=gen.device)
        g.set_state(states[-1])
        rows.append(g)
        one.uniform_(generator=gen)
        states.append(gen.get_state())
    return rows, states


def verify_drafts(
    sampler: Sampler,
    logits: torch.Tensor,
    drafts: list[DraftRows],
    eos_token_ids: set[int],
    failed: dict[str, Exception],
) -> dict[str, list[SampledToken]]:
    """The tokens each chunk keeps (accepted drafts, then one more), by request id. A chunk
    whose rows cannot be sampled goes into ``failed`` (the sampler refuses before drawing
    anything, so the others are sampled again without it)."""
    while drafts:
        x, local = _select(logits, drafts)
        generators, states = [], []
        for d in local:
            rows, after = _row_generators(d.generator, len(d.rows))
            generators.extend(rows)
            states.append(after)
        try:
            out = sampler(x, expanded_batch(local, eos_token_ids, generators))
        except RowFailure as e:
            for d, after in zip(local, states, strict=True):
                if after:
                    d.generator.set_state(after[0])  # nothing was drawn
            bad = set()
            for d in local:
                errors = [e.errors[r] for r in d.rows if r in e.errors]
                if errors:
                    bad.add(d.chunk.request_id)
                    failed[d.chunk.request_id] = _row_error(errors[0], x[d.first : d.first + len(d.rows)])
            drafts = [d for d in drafts if d.chunk.request_id not in bad]
            continue
        tokens = out.token_ids.tolist()
        result = {}
        for d, state in zip(local, states, strict=True):
            draft = d.chunk.draft_token_ids
            t = tokens[d.first : d.first + len(draft) + 1]
            a = 0
            while a < len(draft) and t[a] == draft[a]:
                a += 1
            if state:  # where plain decoding leaves it: one number per emitted token
                d.generator.set_state(state[a + 1])
            result[d.chunk.request_id] = _sampled_tokens(out, d, list(range(d.first, d.first + a + 1)))
        return result
    return {}


def _select(logits: torch.Tensor, drafts: list[DraftRows]) -> tuple[torch.Tensor, list[DraftRows]]:
    """The rows of ``drafts`` in ``logits``, and the drafts renumbered to them."""
    rows: list[int] = []
    local: list[DraftRows] = []
    for d in drafts:
        local.append(DraftRows(d.chunk, len(rows), d.generator))
        rows.extend(d.rows)
    if len(rows) == logits.shape[0]:
        return logits, local
    return logits.index_select(0, _index(rows, logits.device)), local


def _sampled_tokens(out: SamplerOutput, d: DraftRows, rows: list[int]) -> list[SampledToken]:
    """SampledTokens of ``rows`` of ``out`` (all of one chunk)."""
    params = d.chunk.sampling_params
    tokens = out.token_ids[rows].tolist()
    slps = None
    if params.sampling_logprobs and out.sampling_logprobs is not None:
        slps = out.sampling_logprobs[rows].tolist()
    k = params.logprobs
    if k is None or out.logprobs is None:
        return [SampledToken(t, sampling_logprob=None if slps is None else slps[i]) for i, t in enumerate(tokens)]
    lps = out.logprobs[rows].tolist()
    ranks = out.ranks[rows].tolist()
    top_ids = out.top_ids[rows].tolist() if out.top_ids is not None else None
    top_lps = out.top_logprobs[rows].tolist() if out.top_logprobs is not None else None
    return [
        SampledToken(
            token_id=t,
            logprob=lps[i],
            rank=ranks[i],
            top_ids=top_ids[i][:k] if top_ids else [],
            top_logprobs=top_lps[i][:k] if top_lps else [],
            sampling_logprob=None if slps is None else slps[i],
        )
        for i, t in enumerate(tokens)
    ]


def _row_error(error: Exception, raw_logits: torch.Tensor) -> Exception:
    # As ModelRunner._row_error: the model's own non-finite logits are a 500, the
    # request's parameters that made them so a 400.
    if isinstance(error, NonFiniteLogits) and not bool(torch.isfinite(raw_logits).all()):
        return RuntimeError("the model produced non-finite logits (NaN or Inf) for this request")
    return error
