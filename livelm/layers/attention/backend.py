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
from livelm.layers.attention.kv_format import check_kv_format, kv_format_name
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
        window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        """Write the new k/v [T, Hkv, D] into the cache, then attend: q [T, Hq, D] -> [T, Hq * D].

        ``window``: the calling layer's sliding window (``meta.window``; the query at
        position p sees only keys at positions > p - window), None for a global layer.
        ``softcap``: scores (after ``scale``) become softcap * tanh(score / softcap) before
        masking and the softmax (Gemma 2), None: not capped."""
        ...


# KV cache storage types the C++ kernels read in place (uint8: q8_0 rows, kv_format.py).
CPU_KERNEL_KV_DTYPES = (torch.float32, torch.bfloat16, torch.uint8)


def _cpu_backend(device: torch.device, dtype: torch.dtype, head_dim: int, kv_dtype: torch.dtype) -> AttentionBackend:
    if device.type != "cpu" or dtype != torch.float32:
        raise ValueError(f"attention_backend 'cpu' runs fp32 on CPU only, not {dtype} on {device}")
    if kv_dtype not in CPU_KERNEL_KV_DTYPES:
        raise ValueError(f"attention_backend 'cpu' reads a float32, bfloat16 or q8_0 KV cache, not "
                         f"{kv_format_name(kv_dtype)}: use attention_backend 'torch' (or 'auto') for it")
    decode = decode_attention_kernels()
    prefill = prefill_attention_kernels() if head_dim % 16 == 0 else None
    if decode is None and prefill is None:  # no compiler, or disabled: said in the log
        return TorchAttention()
    return CpuKernelAttention(decode, prefill)


def _torch_backend(device: torch.device, dtype: torch.dtype, head_dim: int, kv_dtype: torch.dtype) -> AttentionBackend:
    return TorchAttention()


# Name -> factory(device, dtype, head_dim, kv_dtype), ValueError where that backend cannot run.
ATTENTION_BACKENDS: dict[str, Callable[[torch.device, torch.dtype, int, torch.dtype], AttentionBackend]] = {
    "cpu": _cpu_backend,
    "torch": _torch_backend,
}


def select_attention_backend(name: str, device: torch.device, dtype: torch.dtype, head_dim: int,
                             kv_dtype: torch.dtype | None = None) -> AttentionBackend:
    """The backend ``name`` (EngineConfig.attention_backend) for a model on ``device`` in
    ``dtype`` with a KV cache in ``kv_dtype`` (default: ``dtype``). ``auto``: the C++
    kernels for fp32 on CPU with a float32, bfloat16 or q8_0 cache, torch ops otherwise (CUDA too)."""
    kv_dtype = dtype if kv_dtype is None else kv_dtype
    check_kv_format(kv_dtype, head_dim)
    if name == "auto":
        cpu_ok = device.type == "cpu" and dtype == torch.float32 and kv_dtype in CPU_KERNEL_KV_DTYPES
        name = "cpu" if cpu_ok else "torch"
    factory = ATTENTION_BACKENDS.get(name)
    if factory is None:
        raise ValueError(f"unknown attention backend {name!r}; valid: auto, {', '.join(ATTENTION_BACKENDS)}")
    return factory(device, dtype, head_dim, kv_dtype)
