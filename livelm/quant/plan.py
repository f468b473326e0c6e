"""Which layers of a model keep or get quantized weights (``livelm.models.prepare`` swaps
them in).

``quantization`` (EngineConfig) is ``auto`` (keep what the checkpoint stores: a GGUF's
blocks stay quantized, float tensors stay float), ``none`` (everything float) or a format
name (every linear layer and the token embedding quantized to it at load).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from torch import nn

from livelm.quant.formats import BLOCK, FORMATS, PRECISION_RANK, fits

logger = logging.getLogger("livelm")

QUANTIZATION_MODES: tuple[str, ...] = ("auto", "none", *FORMATS)


def check_quantization(mode: str) -> str:
    """``mode`` when it is a valid EngineConfig.quantization value, else ValueError."""
    if mode not in QUANTIZATION_MODES:
        raise ValueError(f"unsupported quantization {mode!r}; supported: {', '.join(QUANTIZATION_MODES)}")
    return mode


def quantizable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Linear layers and embedding tables that may hold quantized weights, by module path."""
    return {
        path: mod
        for path, mod in model.named_modules()
        if type(mod) in (nn.Linear, nn.Embedding)
    }


def plan_formats(
    model: nn.Module, mode: str, stored: Mapping[str, set[str | None]]
) -> dict[str, str]:
    """The format of each module path that will be quantized.

    ``stored`` maps a module's weight name (``path.weight``) to the formats its checkpoint
    tensors are stored in (None for float parts of a fused weight).
    """
    check_quantization(mode)
    plan: dict[str, str] = {}
    if mode == "none":
        return plan
    for path, mod in quantizable_modules(model).items():
        in_features = mod.in_features if isinstance(mod, nn.Linear) else mod.embedding_dim
        if mode == "auto":
            formats = stored.get(f"{path}.weight", set())
            quantized = {f for f in formats if f is not None}
            if not quantized:
                continue
            fmt = max(quantized, key=PRECISION_RANK.__getitem__)
            if len(formats) > 1:
                logger.info("%s: parts stored as %s share one weight: all kept as %s",
                            path, sorted(str(f) for f in formats), fmt)
        else:
            fmt = mode
        if not fits(fmt, in_features):
            logger.warning("%s stays in float: %d input features are not whole %d-weight %s blocks",
                           path, in_features, BLOCK, fmt)
            continue
        plan[path] = fmt
    return plan

