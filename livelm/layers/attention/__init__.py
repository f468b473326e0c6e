"""Attention over the paged KV cache, behind a backend chosen by configuration
(``EngineConfig.attention_backend``): ``cpu`` (livelm's C++ kernels) or ``torch``."""

from livelm.layers.attention.backend import (
    ATTENTION_BACKENDS,
    AttentionBackend,
    select_attention_backend,
)
from livelm.layers.attention.cpu import CpuKernelAttention
from livelm.layers.attention.metadata import AttentionMetadata, PrefillSegment
from livelm.layers.attention.torch_ops import TorchAttention

__all__ = [
    "ATTENTION_BACKENDS",
    "AttentionBackend",
    "AttentionMetadata",
    "CpuKernelAttention",
    "PrefillSegment",
    "TorchAttention",
    "select_attention_backend",
]
