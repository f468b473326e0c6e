"""GGUF tensors to livelm weights: Q8_0 / Q4_0 / Q4_1 blocks are repacked bit-exactly into
QuantizedTensors; K-quants are dequantized and requantized (Q4_K -> q4_1, Q5_K and Q6_K
-> q8_0, the closest block formats livelm's kernels run); float types become fp32."""

from __future__ import annotations

import logging

import numpy as np
import torch

from livelm.quant.formats import BLOCK, QuantizedTensor, quantize

logger = logging.getLogger("livelm")

# GGUF type -> (livelm format, bytes per 32-weight block, byte offset of the quants).
_BLOCK_LAYOUTS: dict[str, tuple[str, int, int]] = {
    "Q8_0": ("q8_0", 34, 2),
    "Q4_0": ("q4_0", 18, 2),
    "Q4_1": ("q4_1", 20, 4),
}
# K-quants (256-weight super-blocks) and the block format each is requantized to.
K_QUANT_TARGETS: dict[str, str] = {"Q4_K": "q4_1", "Q5_K": "q8_0", "Q6_K": "q8_0"}


def repack_gguf_tensor(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> torch.Tensor | QuantizedTensor:
    """One GGUF tensor's data (``raw``, as gguf's reader gives it) as a float tensor of
    ``shape`` (slowest dimension first) or, for 2-D quantized weights, a QuantizedTensor."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    qtype = GGMLQuantizationType[type_name]
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
    w = torch.from_numpy(np.array(gguf_dequantize(raw, qtype), dtype=np.float32, order="C")).reshape(shape)
    if type_name in K_QUANT_TARGETS and len(shape) == 2 and shape[1] % BLOCK == 0:
        return quantize(w, K_QUANT_TARGETS[type_name])
    return w
