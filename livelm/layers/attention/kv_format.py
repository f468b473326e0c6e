"""How the KV cache stores one (KV head, token) row of ``head_dim`` keys or values.

``kv_cache_dtype`` (EngineConfig) names a format; the cache tensors hold its *storage*
type, so every backend can tell the format from the tensor alone:

- ``float32``, ``bfloat16``, ``float16``: the row as is, rounded to that type.
- ``fp8`` (``float8_e4m3fn``): each element rounded to 8-bit float, saturated at +-448
  (unscaled, as vLLM's default ``k_scale = v_scale = 1``). One byte per element.
- ``q8_0`` (``uint8`` tensors): llama.cpp's Q8_0 block format laid out per row: ``head_dim``
  int8 values, then one float16 scale per 32 of them (``head_dim + head_dim / 16`` bytes;
  68 for head_dim 64, against 256 in float32). A block's scale is ``d = max|x| * (1/127)``
  rounded to float16; its values are ``round(x / d)`` computed as ``x * (1 / d)``, half to
  even. The C++ kernels (``kernels/csrc/kv_types.h``) quantize with exactly this
  arithmetic, so both paths hold the same bytes.

Attention arithmetic stays in the model's dtype: rows are widened as they are read.
"""

from __future__ import annotations

import torch

# kv_cache_dtype -> the element type of the cache tensors ("auto" is the model's dtype).
KV_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "fp8": torch.float8_e4m3fn,
    "q8_0": torch.uint8,
}
Q8_0_BLOCK = 32  # values per scale
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def kv_storage_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache tensors' element type for ``EngineConfig.kv_cache_dtype``."""
    if kv_cache_dtype == "auto":
        return model_dtype
    return KV_STORAGE_DTYPES[kv_cache_dtype]


def kv_format_name(storage: torch.dtype) -> str:
    """The ``kv_cache_dtype`` name of a storage type (for logs and metrics)."""
    for name, dtype in KV_STORAGE_DTYPES.items():
        if dtype == storage:
            return name
    return str(storage).removeprefix("torch.")


def check_kv_format(storage: torch.dtype, head_dim: int) -> None:
    """ValueError when a model's head_dim cannot be stored in this format."""
    if storage == torch.uint8 and head_dim % Q8_0_BLOCK:
        raise ValueError(f"kv_cache_dtype 'q8_0' needs a head_dim divisible by {Q8_0_BLOCK}; this model's is "
                         f"{head_dim}: use bfloat16 or float16")


def kv_row_width(storage: torch.dtype, head_dim: int) -> int:
    """Elements of ``storage`` one (KV head, token) row takes."""
    if storage == torch.uint8:
        return head_dim + 2 * (head_dim // Q8_0_BLOCK)
    return head_dim


def kv_row_bytes(storage: torch.dtype, head_dim: int) -> int:
    """Bytes one (KV head, token) row takes."""
    return kv_row_width(storage, head_dim) * torch.empty((), dtype=storage).element_size()


def encode_kv(x: torch.Tensor, storage: torch.dtype) -> torch.Tensor:
    """Rows ``x [..., head_dim]`` in the cache's format ``[..., kv_row_width]``."""
    if storage == torch.uint8:
        return _quantize_q8_0(x)
    if storage == torch.float8_e4m3fn:
        # Saturate rather than overflow to NaN (the CUDA conversion does not saturate).
        return x.clamp(-FP8_MAX, FP8_MAX).to(storage)
    return x.to(storage)


def decode_kv(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cache rows ``[..., kv_row_width]`` widened to ``dtype`` ``[..., head_dim]``."""
    if rows.dtype == torch.uint8:
        return _dequantize_q8_0(rows, dtype)
    return rows.to(dtype)


def indexable(cache: torch.Tensor) -> torch.Tensor:
    """A view of ``cache`` that index_copy_/index_select accept (their CPU kernels have no
    float8 variant; a byte view moves the same bits)."""
    return cache.view(torch.uint8) if cache.dtype == torch.float8_e4m3fn else cache


def _quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    head_dim = x.shape[-1]
    blocks = x.float().reshape(*x.shape[:-1], head_dim // Q8_0_BLOCK, Q8_0_BLOCK)
    d = blocks.abs().amax(dim=-1, keepdim=True) * (1.0 / 127)
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    q = torch.round(blocks * inv).clamp_(-127, 127).to(torch.int8)
    scales = d.to(torch.float16)
    return torch.cat([q.reshape(*x.shape[:-1], head_dim).view(torch.uint8),
                      scales.reshape(*x.shape[:-1], -1).view(torch.uint8)], dim=-1)


def _dequantize_q8_0(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    head_dim = rows.shape[-1] * Q8_0_BLOCK // (Q8_0_BLOCK + 2)
    values = rows[..., :head_dim].contiguous().view(torch.int8)
    scales = rows[..., head_dim:].contiguous().view(torch.float16)
    blocks = values.reshape(*rows.shape[:-1], -1, Q8_0_BLOCK).float() * scales.float().unsqueeze(-1)
    return blocks.reshape(*rows.shape[:-1], head_dim).to(dtype)
