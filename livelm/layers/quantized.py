"""nn.Modules whose weights stay quantized: a linear layer and an embedding table, over the
formats and matmuls of ``livelm.quant``.

The quantized tensors are buffers (``qs``, ``d`` and, for q4_1, ``m``; GGUF's raw block
formats only ``qs``) so ``.to(device)``
moves them; scales are integer bit patterns, so ``.to(dtype)`` leaves them alone.
"""

from __future__ import annotations

import torch
from torch import nn

from livelm.kernels.extensions import int8_linear_kernels
from livelm.quant import matmul
from livelm.quant.formats import FORMAT_CODES, QuantizedTensor, empty_quantized
from livelm.quant.int8_activations import int8_linear


class QuantizedModule(nn.Module):
    """Holds one [out, in] quantized weight as buffers."""

    def __init__(self, fmt: str, out_features: int, in_features: int) -> None:
        super().__init__()
        self.fmt, self.out_features, self.in_features = fmt, out_features, in_features
        qt = empty_quantized(fmt, out_features, in_features)
        for name, t in qt.tensors().items():
            self.register_buffer(name, t)
        if qt.d is None:  # GGUF's raw block formats: the scales are inside qs
            self.d = None
        if qt.m is None:
            self.m = None

    @property
    def qweight(self) -> QuantizedTensor:
        """The weight as a QuantizedTensor (views of the buffers)."""
        return QuantizedTensor(self.fmt, (self.out_features, self.in_features), self.qs, self.d, self.m)

    def __setattr__(self, name: str, value) -> None:
        if name in ("qs", "d", "m", "bias"):  # the cached kernel arguments name the old ones
            self.__dict__.pop("_kernel_args", None)
        super().__setattr__(name, value)

    def _apply(self, fn, recurse: bool = True):
        self.__dict__.pop("_kernel_args", None)  # .to() and friends make new buffers
        return super()._apply(fn, recurse)

    def share_weight(self, other: QuantizedModule) -> None:
        """Use ``other``'s buffers (a tied LM head reads the embedding's quantized table)."""
        assert (other.fmt, other.out_features, other.in_features) == (self.fmt, self.out_features, self.in_features)
        self.qs, self.d, self.m = other.qs, other.d, other.m

    def extra_repr(self) -> str:
        return f"{self.fmt}, out_features={self.out_features}, in_features={self.in_features}"


class QuantLinear(QuantizedModule):
    """``y = x @ W.T + b`` with W quantized (fused kernels for decode, tiled GEMM for prefill).

    ``int8_activations`` (set by ``livelm.models.loader.use_int8_activations``; q8_0, q4_0
    and q4_1 only) quantizes x to int8 per 32-block first on CPU
    (``livelm.quant.int8_activations``)."""

    def __init__(self, in_features: int, out_features: int, fmt: str, bias: bool = False) -> None:
        super().__init__(fmt, out_features, in_features)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.int8_activations = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features] in x's dtype."""
        # Decode steps call this ~120 times per token: skip the dispatcher when the C++
        # CPU kernel applies (2-D fp32 rows, as many as it is the faster path for).
        if self.int8_activations and not x.is_cuda:
            if x.dim() == 2 and x.dtype == torch.float32:
                ext8 = int8_linear_kernels()
                if ext8 is not None:
                    args = self.__dict__.get("_kernel_args")
                    if args is None:
                        args = self.__dict__["_kernel_args"] = (self.qs, self.d, self.m, self.bias, FORMAT_CODES[self.fmt])
                    return ext8.int8_linear(x, *args)
            return int8_linear(x, self.qweight, self.bias)
        if x.dim() == 2 and x.dtype == torch.float32 and not x.is_cuda:
            ext = matmul.quant_linear_kernels()
            if ext is not None and x.shape[0] <= matmul.fused_max_rows(ext):
                # The buffers as one plain attribute: each buffer access goes through
                # nn.Module.__getattr__ (~600 a decode step otherwise).
                args = self.__dict__.get("_kernel_args")
                if args is None:
                    args = self.__dict__["_kernel_args"] = (self.qs, self.d, self.m, self.bias, FORMAT_CODES[self.fmt])
                return ext.quantized_matmul(x, *args)
        return matmul.quantized_linear(x, self.qweight, self.bias)


class QuantEmbedding(QuantizedModule):
    """An embedding table kept quantized; a lookup dequantizes only the rows it reads."""

    def __init__(self, num_embeddings: int, embedding_dim: int, fmt: str) -> None:
        super().__init__(fmt, num_embeddings, embedding_dim)
        # Empty float buffer whose dtype follows module.to(dtype): the dtype of the lookups.
        self.register_buffer("dtype_probe", torch.empty(0), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [...] -> [..., embedding_dim] in the module's float dtype."""
        return matmul.embedding_rows(self.qweight, ids).to(self.dtype_probe.dtype)


class SplitQuantLinear(nn.Module):
    """A fused linear (q|k|v, gate|up) whose parts a checkpoint stores in different formats
    (a GGUF's Q4_K q/k with a Q6_K v, say): one bias-free QuantLinear per part, each in its
    own format so no part is requantized, outputs concatenated, then the fused bias."""

    def __init__(self, in_features: int, parts: tuple[tuple[int, str], ...], bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = sum(rows for rows, _ in parts)
        self.parts = nn.ModuleList(QuantLinear(in_features, rows, fmt) for rows, fmt in parts)
        self.starts = tuple(sum(rows for rows, _ in parts[:i]) for i in range(len(parts)))
        self.bias = nn.Parameter(torch.empty(self.out_features)) if bias else None

    def part_at(self, start: int, rows: int | None) -> QuantLinear:
        """The part holding rows [start, start + rows) of the fused weight (ValueError if none)."""
        for first, part in zip(self.starts, self.parts, strict=True):
            if first == start and rows in (None, part.out_features):
                return part
        raise ValueError(f"rows {start}..{start + (rows or 0)} are not one part of this split linear "
                         f"(parts start at {list(self.starts)})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features] in x's dtype."""
        out = torch.cat([part.forward(x) for part in self.parts], dim=-1)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return f"formats={[p.fmt for p in self.parts]}, in_features={self.in_features}"
