"""GGUF tensors to livelm weights, every quantized type kept in its own format: Q8_0 /
Q4_0 / Q4_1 blocks are repacked bit-exactly into QuantizedTensors (quants and scales
split); Q5_0 / Q5_1 / Q4_K / Q5_K / Q6_K blocks are kept byte for byte (the raw formats of
livelm/quant/gguf_blocks.py); float types become fp32. Nothing is requantized."""

from __future__ import annotations

import numpy as np
import torch

from livelm.quant.formats import BLOCK, QuantizedTensor
from livelm.quant.gguf_blocks import RAW_LAYOUTS

# GGUF type -> (livelm format, bytes per 32-weight block, byte offset of the quants).
_BLOCK_LAYOUTS: dict[str, tuple[str, int, int]] = {
    "Q8_0": ("q8_0", 34, 2),
    "Q4_0": ("q4_0", 18, 2),
    "Q4_1": ("q4_1", 20, 4),
}
# GGUF types kept as raw blocks, by their livelm format name.
RAW_GGUF_TYPES: dict[str, str] = {fmt.upper(): fmt for fmt in RAW_LAYOUTS}
# Every GGUF tensor type livelm loads (the rest are refused by name at conversion).
SUPPORTED_GGUF_TYPES: tuple[str, ...] = ("F32", "F16", "BF16", *_BLOCK_LAYOUTS, *RAW_GGUF_TYPES)


def livelm_format(type_name: str) -> str | None:
    """The livelm format a 2-D GGUF tensor of ``type_name`` is kept in (None: float)."""
    if type_name in _BLOCK_LAYOUTS:
        return _BLOCK_LAYOUTS[type_name][0]
    return RAW_GGUF_TYPES.get(type_name)


def repack_gguf_tensor(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> torch.Tensor | QuantizedTensor:
    """One GGUF tensor's data (``raw``, as gguf's reader gives it) as a float tensor of
    ``shape`` (slowest dimension first) or, for 2-D quantized weights, a QuantizedTensor
    (owning its memory: the reader's arrays map the file read-only)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    qtype = GGMLQuantizationType[type_name]
    if len(shape) == 2 and type_name in RAW_GGUF_TYPES:
        fmt = RAW_GGUF_TYPES[type_name]
        n, k = shape
        qs = np.ascontiguousarray(raw).view(np.uint8).reshape(n, -1)
        return QuantizedTensor(fmt, (n, k), torch.from_numpy(qs.copy()))
    if type_name in _BLOCK_LAYOUTS and len(shape) == 2:
        fmt, block_bytes, qs_offset = _BLOCK_LAYOUTS[type_name]
        n, k = shape
        blocks = np.ascontiguousarray(raw).view(np.uint8).reshape(n, k // BLOCK, block_bytes)
        d = torch.from_numpy(np.ascontiguousarray(blocks[..., 0:2]).view(np.int16).reshape(n, k // BLOCK))
        m = None
        if fmt == "q4_1":
            m = torch.from_numpy(np.ascontiguousarray(blocks[..., 2:4]).view(np.int16).reshape(n, k // BLOCK))
        qs_np = np.ascontiguousarray(blocks[..., qs_offset:]).reshape(n, -1)
        qs = torch.from_numpy(qs_np.view(np.int8) if fmt == "q8_0" else qs_np)
        return QuantizedTensor(fmt, (n, k), qs, d, m)
    return torch.from_numpy(np.array(gguf_dequantize(raw, qtype), dtype=np.float32, order="C")).reshape(shape)
