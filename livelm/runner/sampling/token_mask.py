"""Constrained rows: the tokens a grammar allows, applied to the logits as -inf elsewhere.

The runner hands the sampler a :class:`TokenMask` for the rows under a constraint (one bit
per token, as llguidance fills it). :func:`apply_token_mask` returns fp32 logits with
every disallowed token of those rows at -inf: a fresh tensor, the caller's logits stay as
they were (their logprobs are those of the raw distribution). Unconstrained rows are
copied unchanged, so their tokens are exactly those of a batch without constraints. Ids
past the bitmask's width (rows the model has beyond its tokenizer) are never allowed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from livelm.runner.sampling.rows import _NEG_INF, _index


@dataclass(frozen=True)
class TokenMask:
    """Allowed tokens of some rows of a batch: row ``rows[j]`` may only take the tokens
    whose bit is set in ``bitmask[j]`` (``[R, W]`` int32, bit ``t % 32`` of word ``t // 32``)."""

    rows: list[int]
    bitmask: torch.Tensor


_SHIFTS: dict[torch.device, torch.Tensor] = {}


def _shifts(device: torch.device) -> torch.Tensor:
    s = _SHIFTS.get(device)
    if s is None:
        s = _SHIFTS[device] = torch.arange(32, dtype=torch.int32, device=device)
    return s


def allowed_tokens(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[R, vocab]`` bool: which tokens each row's bitmask allows."""
    r, words = bitmask.shape
    bits = (bitmask.unsqueeze(-1) >> _shifts(bitmask.device)) & 1
    allowed = bits.view(r, words * 32).bool()
    if words * 32 >= vocab:
        return allowed[:, :vocab]
    return torch.nn.functional.pad(allowed, (0, vocab - words * 32), value=False)


def apply_token_mask(logits: torch.Tensor, mask: TokenMask) -> torch.Tensor:
    """fp32 copy of ``logits`` ``[N, V]`` with the masked rows' disallowed tokens at -inf."""
    x = logits.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    if not mask.rows:
        return x
    allowed = allowed_tokens(mask.bitmask.to(x.device, non_blocking=True), x.shape[1])
    if len(mask.rows) == x.shape[0] and mask.rows == list(range(x.shape[0])):
        x.masked_fill_(~allowed, _NEG_INF)
        return x
    idx = _index(mask.rows, x.device)
    x.index_copy_(0, idx, x.index_select(0, idx).masked_fill_(~allowed, _NEG_INF))
    return x
