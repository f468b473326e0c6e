"""The attention backend protocol, the backends by name, and choosing one by configuration.

Adding a backend (CUDA kernels, say): a module here with a class that implements
:class:`AttentionBackend`, a factory for it in :data:`ATTENTION_BACKENDS` (raising
ValueError where it cannot run), its name in ``livelm.config.ATTENTION_BACKEND_CHOICES``,
and, if it should be the default there, a case in :func:`select_attention_backend`'s
``auto`` branch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from livelm.kernels.extensions import decode_attention_kernels, prefill_attention_kernels
from livelm.layers.attention.cpu import CpuKernelAttention
from livelm.layers.attention.metadata import AttentionMetadata
from livelm.layers.attention.torch_ops import TorchAttention


class AttentionBackend(Protocol):
    """How the layers attend over the paged KV cache.

    The runner builds one :class:`AttentionMetadata` per step (slots, decode block tables
    and lengths, prefill segments), hands it to :meth:`prepare` once, then every layer
    calls :meth:`forward` with it.
    """

    name: str

    def prepare(self, meta: AttentionMetadata, dtype: torch.dtype) -> None:
        """Add to ``meta`` what this backend's forward needs beyond the common fields
        (``dtype``: that of the KV cache and the activations)."""
        ...

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """Write the new k/v [T, Hkv, D] into the cache, then attend: q [T, Hq, D] -> [T, Hq * D]."""
        ...


def _cpu_backend(device: torch.device, dtype: torch.dtype, head_dim: int) -> AttentionBackend:
    if device.type != "cpu" or dtype != torch.float32:
        raise ValueError(f"attention_backend 'cpu' runs fp32 on CPU only, not {dtype} on {device}")
    decode = decode_attention_kernels()
    prefill = prefill_attention_kernels() if head_dim % 16 == 0 else None
    if decode is None and prefill is None:  # no compiler, or disabled: said in the log
        return TorchAttention()
    return CpuKernelAttention(decode, prefill)


def _torch_backend(device: torch.device, dtype: torch.dtype, head_dim: int) -> AttentionBackend:
    return TorchAttention()


# Name -> factory(device, dtype, head_dim), ValueError where that backend cannot run.
ATTENTION_BACKENDS: dict[str, Callable[[torch.device, torch.dtype, int], AttentionBackend]] = {
    "cpu": _cpu_backend,
    "torch": _torch_backend,
}


def select_attention_backend(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> AttentionBackend:
    """The backend ``name`` (EngineConfig.attention_backend) for a model on ``device`` in
    ``dtype``. ``auto``: the C++ kernels for fp32 on CPU, torch ops otherwise (CUDA too)."""
    if name == "auto":
        name = "cpu" if device.type == "cpu" and dtype == torch.float32 else "torch"
    factory = ATTENTION_BACKENDS.get(name)
    if factory is None:
        raise ValueError(f"unknown attention backend {name!r}; valid: auto, {', '.join(ATTENTION_BACKENDS)}")
    return factory(device, dtype, head_dim)
