"""min_tokens suppression and the repetition / presence / frequency penalties.

Repetition follows Hugging Face (prompt + output tokens), presence / frequency follow OpenAI
(output tokens only); repetition is applied first (vLLM's order).
"""

from __future__ import annotations

from itertools import chain

import torch

from livelm.runner.sampling.batch import SamplingBatch
from livelm.runner.sampling.rows import _NEG_INF


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
