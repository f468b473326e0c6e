"""Tensor-parallel pieces of a layer: a rank's slice of a linear or an embedding table, the
all-reduce after a row-parallel one, and the vocabulary-parallel embedding and LM head.

A column-parallel linear keeps some rows of the weight (output features: q/k/v heads,
gate|up rows) and needs no communication; a row-parallel linear keeps a range of columns
(input features) and its partial outputs are summed over the ranks
(:class:`AllReduceLinear`; a whole block of partial sums, a mixture-of-experts block,
:class:`AllReduceBlock`). The slicing works on fp32 ``nn.Linear`` / ``nn.Embedding`` and on
quantized weights, whose rows are independent and whose columns are cut at block
boundaries (a block's bytes and scale move together), so nothing is dequantized or
requantized.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from livelm.layers.quantized import QuantEmbedding, QuantLinear, SplitQuantLinear
from livelm.quant.formats import block_weights


class TensorParallelGroup:
    """The ranks of one tensor-parallel engine, over a gloo process group (rank 0 is the
    engine's own process)."""

    def __init__(self, process_group: Any, rank: int, world_size: int) -> None:
        self.process_group = process_group
        self.rank = rank
        self.world_size = world_size

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place (every rank calls it, in the same order)."""
        self.process_group.allreduce([tensor]).wait()
        return tensor


class AllReduceBlock(nn.Module):
    """A module whose output on each rank is a partial sum of the whole one (linear in the
    rank's share of the weights): that output, summed over the ranks."""

    def __init__(self, inner: nn.Module, group: TensorParallelGroup) -> None:
        super().__init__()
        self.inner = inner
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The inner module's output over ``x``, summed over the ranks (the same on each)."""
        out = self.inner.forward(x)
        if not out.is_contiguous():
            out = out.contiguous()
        return self.group.all_reduce_(out)


class AllReduceLinear(AllReduceBlock):
    """A row-parallel linear: this rank's partial product (x [..., in_features / world]),
    summed over the ranks into [..., out_features]."""


class VocabParallelEmbedding(nn.Module):
    """A vocabulary-parallel token embedding: this rank holds the rows [start, start + rows)
    of the table; a lookup gives rows of zeros for the ids other ranks hold, and one
    all-reduce sums the ranks' partial embeddings (exactly the whole table's rows: each id
    is non-zero on one rank only)."""

    def __init__(self, inner: nn.Module, group: TensorParallelGroup, start: int) -> None:
        super().__init__()
        self.inner = inner
        self.group = group
        self.start = start
        self.rows = inner.num_embeddings if isinstance(inner, nn.Embedding) else inner.out_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [...] -> [..., embedding_dim], the same on every rank."""
        local = ids - self.start
        elsewhere = (local < 0) | (local >= self.rows)
        out = self.inner.forward(local.masked_fill(elsewhere, 0))
        out = out.masked_fill(elsewhere.unsqueeze(-1), 0)
        return self.group.all_reduce_(out.contiguous())


class VocabParallelHead(nn.Module):
    """A vocabulary-parallel LM head: this rank's rows of the vocabulary, the logits of
    every rank gathered (all ranks call it together, on the same rows)."""

    def __init__(self, inner: nn.Module, group: TensorParallelGroup) -> None:
        super().__init__()
        self.inner = inner
        self.group = group

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] (this rank's [N, vocab / world] gathered)."""
        local = self.inner.forward(hidden).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.group.world_size)]
        self.group.process_group.allgather([parts], [local]).wait()
        return torch.cat(parts, dim=-1)


def keep_rows(linear: nn.Module, ranges: Sequence[tuple[int, int]]) -> nn.Module:
    """``linear`` with only the output rows in ``ranges`` ([start, stop) pairs, in order),
    as a new module of the same kind (bias rows too); an embedding table (fp32 or
    quantized) keeps those rows of the vocabulary."""
    index = torch.cat([torch.arange(a, b) for a, b in ranges])
    if type(linear) is nn.Embedding:
        table = linear.weight.detach()[index].clone()
        return nn.Embedding(len(index), linear.embedding_dim, _weight=table).requires_grad_(False)
    if isinstance(linear, QuantEmbedding):
        out = QuantEmbedding(len(index), linear.in_features, linear.fmt)
        out.dtype_probe = linear.dtype_probe  # the lookups' float dtype
        _copy_quantized_rows(linear, out, index)
        return out
    if type(linear) is nn.Linear:
        out = nn.Linear(linear.in_features, len(index), bias=linear.bias is not None,
                        device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(linear.weight[index])
            if linear.bias is not None:
                out.bias.copy_(linear.bias[index])
        return out.requires_grad_(False)
    if isinstance(linear, QuantLinear):
        out = QuantLinear(linear.in_features, len(index), linear.fmt, bias=linear.bias is not None)
        _copy_quantized_rows(linear, out, index)
        if linear.bias is not None:
            out.bias = nn.Parameter(linear.bias.detach()[index].clone(), requires_grad=False)
        return out
    if isinstance(linear, SplitQuantLinear):
        return _keep_split_rows(linear, ranges)
    raise ValueError(f"tensor parallelism cannot split a {type(linear).__name__}")


def _copy_quantized_rows(source: nn.Module, dest: nn.Module, index: torch.Tensor) -> None:
    """Set ``dest``'s quantized buffers to the rows ``index`` of ``source``'s (rows are
    independent in every format: int8 keeps one scale per row, [N]; the block formats
    [N, blocks])."""
    for name in ("qs", "d", "m"):
        t = getattr(source, name)
        setattr(dest, name, None if t is None else t[index].clone(memory_format=torch.contiguous_format))


def _keep_split_rows(linear: SplitQuantLinear, ranges: Sequence[tuple[int, int]]) -> SplitQuantLinear:
    """The rows in ``ranges`` of a linear stored in parts of different formats: each part
    keeps its share, in its own format."""
    pieces: list[QuantLinear] = []
    for first, part in zip(linear.starts, linear.parts, strict=True):
        last = first + part.out_features
        mine = [(max(a, first) - first, min(b, last) - first) for a, b in ranges if a < last and b > first]
        if mine:
            pieces.append(keep_rows(part, mine))
    out = SplitQuantLinear(linear.in_features, tuple((p.out_features, p.fmt) for p in pieces),
                           bias=linear.bias is not None)
    out.parts = nn.ModuleList(pieces)
    if linear.bias is not None:
        index = torch.cat([torch.arange(a, b) for a, b in ranges])
        out.bias = nn.Parameter(linear.bias.detach()[index].clone(), requires_grad=False)
    return out


def keep_columns(linear: nn.Module, start: int, stop: int) -> nn.Module:
    """``linear`` with only the input columns [start, stop) (no bias: a row-parallel linear's
    bias would be summed once per rank; the caller keeps it on one rank)."""
    if type(linear) is nn.Linear:
        if linear.bias is not None:
            raise ValueError("tensor parallelism does not split a row-parallel linear with a bias")
        out = nn.Linear(stop - start, linear.out_features, bias=False,
                        device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(linear.weight[:, start:stop])
        return out.requires_grad_(False)
    if isinstance(linear, QuantLinear):
        if linear.bias is not None:
            raise ValueError("tensor parallelism does not split a row-parallel linear with a bias")
        per_block = block_weights(linear.fmt)
        if start % per_block or stop % per_block:
            raise ValueError(f"a {linear.fmt} weight of {linear.in_features} columns cannot be split at "
                             f"column {start if start % per_block else stop}: its blocks are {per_block} wide")
        out = QuantLinear(stop - start, linear.out_features, linear.fmt)
        blocks = linear.in_features // per_block
        for name in ("qs", "d", "m"):
            t = getattr(linear, name)
            if t is None or t.dim() == 1:  # absent, or int8's one scale per row
                setattr(out, name, None if t is None else t.clone(memory_format=torch.contiguous_format))
                continue
            width = t.shape[1] // blocks  # bytes (qs) or scales (d, m) per block
            setattr(out, name, t[:, start // per_block * width: stop // per_block * width].clone(memory_format=torch.contiguous_format))
        return out
    raise ValueError(f"tensor parallelism cannot split the columns of a {type(linear).__name__}")
