"""Every change livelm makes to a model's modules after building it, in one place.

Two moments, since quantized storage must exist before the weights are loaded into it while
packed copies are made from loaded weights:

1. :func:`swap_quantized_modules` (the loader, on the meta device, before loading):
   planned nn.Linear / nn.Embedding become QuantLinear / QuantEmbedding, and a tied LM
   head of a quantized embedding gets a QuantLinear of its own (sharing the table once
   the weights exist).
2. :func:`prepare_model` (the runner, once, on the loaded model): fp32 CPU linears are
   packed, the tied LM head gets its packed copy, and submodules are bound as plain
   attributes (last: the modules are final then).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from livelm.layers.packed_linear import pack_linear_layers, packed_linear
from livelm.layers.quantized import QuantEmbedding, QuantLinear, SplitQuantLinear
from livelm.models.llama import LlamaForCausalLM


def swap_quantized_modules(model: LlamaForCausalLM, plan: Mapping[str, str | tuple[tuple[int, str], ...]]) -> None:
    """Replace each planned nn.Linear / nn.Embedding by its quantized counterpart (same
    device; a fused linear planned in parts by a SplitQuantLinear); a tied LM head reads
    the quantized embedding table through its own QuantLinear."""
    for path, fmt in plan.items():
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        old = getattr(parent, attr)
        if isinstance(fmt, tuple):
            new: nn.Module = SplitQuantLinear(old.in_features, fmt, bias=old.bias is not None)
        elif isinstance(old, nn.Linear):
            new = QuantLinear(old.in_features, old.out_features, fmt, bias=old.bias is not None)
        else:
            new = QuantEmbedding(old.num_embeddings, old.embedding_dim, fmt)
        setattr(parent, attr, new)
    cfg = model.config
    if cfg.tie_word_embeddings and "embed_tokens" in plan:
        model.lm_head = QuantLinear(cfg.hidden_size, cfg.vocab_size, plan["embed_tokens"])


def prepare_model(model: LlamaForCausalLM) -> nn.Module | None:
    """Make a loaded model ready to run; returns the tied LM head's packed copy, if any.

    fp32 on CPU: linears over weights packed once (livelm's panel GEMM, else oneDNN). A
    tied LM head needs its own packed copy: the embedding lookup keeps the table.
    """
    tied_head: nn.Module | None = None
    if model.lm_head is None and isinstance(model.embed_tokens, nn.Embedding):
        tied_head = packed_linear(model.embed_tokens.weight, None)
    pack_linear_layers(model)
    _bind_submodules(model)  # last: the modules are final now
    return tied_head


def _bind_submodules(model: torch.nn.Module) -> None:
    """Make every submodule a plain instance attribute of its parent as well.

    ``parent.child`` otherwise goes through ``nn.Module.__getattr__`` (a Python call with
    dict lookups), ~300 times per decode step. Safe against later swaps: assigning a module
    to an attribute (``setattr(parent, name, new)``) removes the instance entry first.
    """
    for module in model.modules():
        for name, child in module._modules.items():
            if child is not None:
                module.__dict__[name] = child
