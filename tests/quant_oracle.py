"""Helpers for quantized-model tests: the exactly dequantized weights of a loaded livelm
model as a transformers-loadable directory, livelm's teacher-forced logits, resident bytes."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from livelm.layers.attention import AttentionMetadata, PrefillSegment, TorchAttention
from livelm.layers.quantized import QuantizedModule
from livelm.models.llama import LlamaForCausalLM
from livelm.quant.formats import dequantize


def float_state(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """Every weight of ``model`` in fp32 (quantized ones exactly dequantized), livelm names."""
    state: dict[str, torch.Tensor] = {}
    for path, mod in model.named_modules():
        if isinstance(mod, QuantizedModule):
            state[f"{path}.weight"] = dequantize(mod.qweight)
    for name, p in model.named_parameters():
        state[name] = p.detach().float()
    return state


def write_dequantized_hf_dir(model: LlamaForCausalLM, src_dir: Path, out_dir: Path) -> Path:
    """``src_dir``'s config and tokenizer with ``model``'s dequantized weights (HF names)."""
    cfg = model.config
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    out: dict[str, torch.Tensor] = {}
    for name, t in float_state(model).items():
        if name.startswith("lm_head.") and cfg.tie_word_embeddings:
            continue
        hf = name if name.startswith("lm_head.") else f"model.{name}"
        if ".qkv_proj." in hf:
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), t.split([q, kv, kv]), strict=True):
                out[hf.replace("qkv_proj", part)] = chunk.contiguous()
        elif ".gate_up_proj." in hf:
            for part, chunk in zip(("gate_proj", "up_proj"), t.chunk(2), strict=True):
                out[hf.replace("gate_up_proj", part)] = chunk.contiguous()
        else:
            out[hf] = t.contiguous()
    shutil.copytree(src_dir, out_dir)
    for old in out_dir.glob("*.safetensors*"):
        old.unlink()
    save_file(out, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir


@torch.inference_mode()
def livelm_logits(model: LlamaForCausalLM, ids: list[int], one_token_at_a_time: bool = False) -> torch.Tensor:
    """Teacher-forced fp32 logits [len(ids), vocab]: one prefill of the whole sequence (the
    prefill-sized kernels), or one token per forward pass (the decode-sized kernels)."""
    cfg = model.config
    t = len(ids)
    kv = [(torch.zeros(cfg.num_kv_heads, t, cfg.head_dim), torch.zeros(cfg.num_kv_heads, t, cfg.head_dim))
          for _ in range(cfg.num_layers)]
    chunks = [(p, 1) for p in range(t)] if one_token_at_a_time else [(0, t)]
    rows = []
    for start, n in chunks:
        ctx = torch.arange(start + n)
        seg = (PrefillSegment(0, n, None, None) if start == 0 else
               PrefillSegment(0, n, ctx, torch.ones(n, start + n, dtype=torch.bool)))
        meta = AttentionMetadata(slot_mapping=torch.arange(start, start + n), num_decodes=0,
                                 decode_block_tables=None, decode_lens=None, block_size=16, prefills=[seg],
                                 backend=TorchAttention())
        hidden = model(torch.tensor(ids[start : start + n]), torch.arange(start, start + n), kv, meta)
        rows.append(model.compute_logits(hidden))
    return torch.cat(rows)


def resident_weight_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers, shared storage counted once, without
    the rotary tables (derived, not weights)."""
    seen: set[int] = set()
    total = 0
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if name.startswith("rotary.") or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
