"""Quantized weights in safetensors files: ``<name>.qs``, ``<name>.d`` (and ``<name>.m``),
with each weight's format listed as JSON under the file's ``livelm.quant`` metadata key."""

from __future__ import annotations

import json

import torch

from livelm.quant.formats import QuantizedTensor, check_format, is_raw
from livelm.quant.gguf_blocks import RAW_LAYOUTS

QUANT_METADATA_KEY = "livelm.quant"


def stored_quantized(fmt: str, parts: dict[str, torch.Tensor]) -> QuantizedTensor:
    """The QuantizedTensor stored as ``parts`` (keys ``qs``, ``d`` and maybe ``m``; the raw
    GGUF block formats: ``qs`` only, uint8 [N, row bytes])."""
    check_format(fmt)
    needed = {"qs"} if is_raw(fmt) else {"qs", "d", *(("m",) if fmt == "q4_1" else ())}
    missing = needed - set(parts)
    if missing:
        raise ValueError(f"quantized {fmt} weight lacks its {', '.join(sorted(missing))} tensor(s)")
    qs = parts["qs"]
    if is_raw(fmt):
        qk, nbytes = RAW_LAYOUTS[fmt]
        if qs.dim() != 2 or qs.dtype != torch.uint8 or qs.shape[1] % nbytes:
            raise ValueError(f"quantized {fmt} weight: qs must be uint8 [rows, k / {qk} * {nbytes}], got "
                             f"{qs.dtype} {tuple(qs.shape)}")
        return QuantizedTensor(fmt, (qs.shape[0], qs.shape[1] // nbytes * qk), qs)
    k = qs.shape[1] * 2 if fmt in ("q4_0", "q4_1") else qs.shape[1]
    return QuantizedTensor(fmt, (qs.shape[0], k), qs, parts["d"], parts.get("m"))


def flatten_for_safetensors(
    weights: dict[str, torch.Tensor | QuantizedTensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors to save (quantized weights split into parts) and the file's metadata."""
    tensors: dict[str, torch.Tensor] = {}
    formats: dict[str, str] = {}
    for name, w in weights.items():
        if isinstance(w, QuantizedTensor):
            formats[name] = w.fmt
            for suffix, t in w.tensors().items():
                tensors[f"{name}.{suffix}"] = t.contiguous()
        else:
            tensors[name] = w
    metadata = {"format": "pt"}
    if formats:
        metadata[QUANT_METADATA_KEY] = json.dumps(formats, sort_keys=True)
    return tensors, metadata
