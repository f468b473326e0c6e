"""Rows that must not be sampled: raised before any row of the batch is drawn.

A row whose logits (after penalties and temperature) hold NaN, +Inf or nothing but -Inf has
no distribution to sample: its draw would give an id past the vocabulary (and fail the next
step) or an arbitrary one. The sampler checks each row's largest logit (NaN propagates
through ``max``), a value it computes anyway for greedy rows and one reduction for the
others, and raises :class:`RowFailure` naming the rows *before* any row is drawn. No
generator has advanced then, so the runner can drop those rows and sample the rest again:
their tokens are exactly those of a batch without the failed rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class RowFailure(Exception):
    """Rows of a sampling batch that cannot be sampled; ``errors`` maps a row index to the
    error its request ends with. Raised before any row of the batch drew a token."""

    def __init__(self, errors: dict[int, Exception]) -> None:
        super().__init__(f"{len(errors)} row(s) of the batch cannot be sampled")
        self.errors = errors


class NonFiniteLogits(ValueError):
    """A row's logits after penalties and temperature hold no finite maximum."""

    def __init__(self) -> None:
        super().__init__(
            "the logits after penalties and temperature are not finite (NaN or Inf): "
            "check temperature, repetition_penalty, presence_penalty and frequency_penalty"
        )


def check_finite_rows(*maxima: tuple[torch.Tensor, Sequence[int] | None]) -> None:
    """Raise :class:`RowFailure` for the rows whose largest logit is not finite.

    Each argument is ``(row_max [R], rows)``: the per-row maxima of some rows of the batch
    and their indices in it (``None``: rows ``0..R-1``). One device sync when all are fine.
    """
    bad: dict[int, Exception] = {}
    for top, rows in maxima:
        if top.numel() == 0 or bool(torch.isfinite(top).all()):
            continue
        for i in (~torch.isfinite(top)).nonzero().flatten().tolist():
            bad[rows[i] if rows is not None else i] = NonFiniteLogits()
    if bad:
        raise RowFailure(bad)
