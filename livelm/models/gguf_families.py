"""Config fields of the GGUF families beyond the dense llama ones: Phi-3's LongRoPE,
partial rotary and sliding window, the mixture-of-experts shapes (Qwen2-MoE with its
shared expert, Qwen3-MoE, Mixtral), and Gemma 2 / 3's soft caps, windows and attention scale.

llama.cpp's converter writes Phi-3's LongRoPE only as two tensors of per-pair factors
(``rope_factors_long`` / ``rope_factors_short``), the original context length and the
attention factor it computed; they go back into ``rope_scaling`` as transformers'
Phi3Config reads it. The attention factor is kept only when it differs from the one
transformers derives from the two lengths (the same formula), so a converted config equals
the original. MoE routing normalisation is not in the file: llama.cpp fixes it per
architecture (Qwen2-MoE: raw softmax weights, Qwen3-MoE and Mixtral: renormalised), and an
``<arch>.expert_weights_norm`` key, where present, overrides that.

Gemma files carry neither the attention scale (``query_pre_attn_scalar``) nor which layers
slide, nor the sliding layers' RoPE base in older files: llama.cpp derives them, and so do
we, the same way (see :func:`gemma_config`); keys that state them win.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

import numpy as np

from livelm.models.gguf_metadata import field, require
from livelm.models.gguf_names import ROPE_FACTORS


def _decimals(values: Any) -> list[float]:
    # The shortest decimal of each float32 (1.05, not 1.0499999523): the config's own values.
    return [float(str(np.float32(v))) for v in np.asarray(values, dtype=np.float32).reshape(-1)]


def phi3_config(reader: Any, weights: dict[str, Any], head_dim: int, max_positions: int) -> dict[str, Any]:
    """Phi3Config fields read from a phi3 file: partial rotary, sliding window, LongRoPE."""
    kwargs: dict[str, Any] = {}
    rotated = field(reader, "phi3.rope.dimension_count")
    if rotated is not None and int(rotated) != head_dim:
        kwargs["partial_rotary_factor"] = int(rotated) / head_dim
    window = field(reader, "phi3.attention.sliding_window")
    kwargs["sliding_window"] = int(window) if window else None  # 0: none (Phi-4's converter)
    original = field(reader, "phi3.rope.scaling.original_context_length")
    if original is not None:
        kwargs["original_max_position_embeddings"] = int(original)
    present = [name for name in ROPE_FACTORS if name in weights]
    if not present:
        return kwargs
    if len(present) == 1:
        missing = next(name for name in ROPE_FACTORS if name not in weights)
        raise ValueError(f"GGUF file of a phi3 model has {present[0]!r} but lacks tensor {missing!r}: LongRoPE needs both")
    original = int(require(reader, "phi3.rope.scaling.original_context_length", "phi3"))
    long_factor, short_factor = (_decimals(weights[name].numpy()) for name in ROPE_FACTORS)
    scaling: dict[str, Any] = {"rope_type": "longrope", "long_factor": long_factor, "short_factor": short_factor}
    attention = field(reader, "phi3.rope.scaling.attn_factor")
    scale = max_positions / original
    derived = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0
    if attention is not None and not math.isclose(float(attention), derived, rel_tol=1e-6):
        scaling["attention_factor"] = float(attention)
    kwargs["rope_scaling"] = scaling
    return kwargs


def sparse_layers(names: Collection[str], num_layers: int) -> list[bool]:
    """Per layer: whether it has routed experts (its router tensor is in the file)."""
    return [f"blk.{i}.ffn_gate_inp.weight" in names for i in range(num_layers)]


def moe_config(reader: Any, arch: str, family: str, names: Collection[str], num_layers: int) -> dict[str, Any]:
    """The MoE fields of the family's transformers config (see the module doc)."""
    experts = int(require(reader, f"{arch}.expert_count", family))
    used = int(require(reader, f"{arch}.expert_used_count", family))
    if family == "mixtral":
        # Mixtral's experts are its MLP: llama.cpp writes their width as feed_forward_length.
        width = field(reader, f"{arch}.expert_feed_forward_length")
        if width is None:
            width = require(reader, f"{arch}.feed_forward_length", family)
        return {"num_local_experts": experts, "num_experts_per_tok": used, "intermediate_size": int(width)}
    sparse = sparse_layers(names, num_layers)
    norm = field(reader, f"{arch}.expert_weights_norm")
    kwargs: dict[str, Any] = {
        "num_experts": experts,
        "num_experts_per_tok": used,
        "moe_intermediate_size": int(require(reader, f"{arch}.expert_feed_forward_length", family)),
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i, s in enumerate(sparse) if not s],
        "norm_topk_prob": bool(norm) if norm is not None else family == "qwen3moe",
    }
    if family == "qwen2moe":
        kwargs["shared_expert_intermediate_size"] = int(
            require(reader, f"{arch}.expert_shared_feed_forward_length", family)
        )
    return kwargs


# llama.cpp's rule for Gemma's attention scale: the 27B models (46 layers for Gemma 2, 62 for
# Gemma 3) scale by hidden_size / heads, every other size by the head dimension.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def gemma_config(reader: Any, family: str, num_layers: int, hidden: int, n_head: int, head_dim: int) -> dict[str, Any]:
    """Gemma2Config / Gemma3TextConfig fields read (or derived as llama.cpp does) from a file."""
    scale = field(reader, f"{family}.attention.scale")
    if scale is not None:  # a float32 of scalar ** -0.5; the configs hold whole numbers
        scalar = round(float(scale) ** -2)
    elif num_layers == _GEMMA_27B_LAYERS[family]:
        scalar = hidden // n_head
    else:
        scalar = head_dim
    kwargs: dict[str, Any] = {
        "query_pre_attn_scalar": scalar,
        "hidden_activation": "gelu_pytorch_tanh",
        "sliding_window": int(require(reader, f"{family}.attention.sliding_window", family)),
    }
    pattern = field(reader, f"{family}.attention.sliding_window_pattern")
    if isinstance(pattern, list):  # newer files: one flag per layer (True: sliding)
        if len(pattern) != num_layers:
            raise ValueError(f"GGUF key {family}.attention.sliding_window_pattern has {len(pattern)} entries "
                             f"for {num_layers} layers")
        sliding = [bool(p) for p in pattern]
    else:  # a period (every n-th layer global): Gemma 2 alternates, Gemma 3 every 6th
        period = int(pattern) if pattern else (2 if family == "gemma2" else 6)
        sliding = [bool((i + 1) % period) for i in range(num_layers)]
    kwargs["layer_types"] = ["sliding_attention" if s else "full_attention" for s in sliding]
    if family == "gemma2":
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            kwargs[key] = field(reader, f"{family}.{key}")
    else:
        kwargs["rope_local_base_freq"] = float(field(reader, f"{family}.rope.freq_base_swa", 10000.0))
    return kwargs
