"""Row plumbing shared by the sampler's stages: pick, gather and scatter rows of a batch."""

from __future__ import annotations

from collections.abc import Sequence

import torch

_NEG_INF = float("-inf")


def _index(rows: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


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
