"""Which layers of a model keep or get quantized weights (``livelm.models.prepare`` swaps
them in).

``quantization`` (EngineConfig) is ``auto`` (keep what the checkpoint stores: a GGUF's
blocks stay quantized, float tensors stay float), ``none`` (everything float) or a format
name (every linear layer and the token embedding quantized to it at load; the formats
livelm has a quantizer for: not the K-quants, which come only from GGUF files).

Under ``auto`` a fused weight (q|k|v, gate|up) whose parts are stored in different
quantized formats is planned as a split: one part per stored tensor, each in its format
(``SplitQuantLinear``), so nothing is requantized.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from torch import nn

from livelm.quant.formats import PRECISION_RANK, QUANTIZE_FORMATS, block_weights, fits

logger = logging.getLogger("livelm")

QUANTIZATION_MODES: tuple[str, ...] = ("auto", "none", *QUANTIZE_FORMATS)
# A planned module: one format, or (rows, format) per part of a split fused weight.
Planned = str | tuple[tuple[int, str], ...]


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
    model: nn.Module, mode: str, stored: Mapping[str, Mapping[int, tuple[int | None, str | None]]]
) -> dict[str, Planned]:
    """The format of each module path that will be quantized.

    ``stored`` maps a module's weight name (``path.weight``) to its checkpoint tensors:
    first row -> (rows or None for the whole weight, stored format or None for float).
    """
    check_quantization(mode)
    plan: dict[str, Planned] = {}
    if mode == "none":
        return plan
    for path, mod in quantizable_modules(model).items():
        in_features = mod.in_features if isinstance(mod, nn.Linear) else mod.embedding_dim
        if mode == "auto":
            parts = stored.get(f"{path}.weight", {})
            formats = {f for _, f in parts.values()}
            quantized = {f for f in formats if f is not None}
            if not quantized:
                continue
            if len(formats) > 1 and None not in formats and isinstance(mod, nn.Linear):
                plan[path] = tuple((rows, fmt) for _, (rows, fmt) in sorted(parts.items()))  # type: ignore[misc]
                logger.info("%s: parts stored as %s: kept so, one kernel per part", path,
                            [fmt for _, (_, fmt) in sorted(parts.items())])
                continue
            fmt = max(quantized, key=PRECISION_RANK.__getitem__)
            if len(formats) > 1:
                if fmt not in QUANTIZE_FORMATS:  # a float part cannot be quantized to a K-quant
                    fmt = "q8_0"
                logger.info("%s: parts stored as %s share one weight: all kept as %s",
                            path, sorted(str(f) for f in formats), fmt)
        else:
            fmt = mode
        if not fits(fmt, in_features):
            logger.warning("%s stays in float: %d input features are not whole %d-weight %s blocks",
                           path, in_features, block_weights(fmt), fmt)
            continue
        plan[path] = fmt
    return plan

