"""Splitting a loaded model over tensor-parallel ranks (Megatron-style).

Per layer: the fused q|k|v projection keeps this rank's query heads and their key/value
heads (split when there are at least as many KV heads as ranks, else each rank keeps the
one KV head its query heads share: replicated); ``o_proj`` keeps the matching input
columns and sums over the ranks; gate|up keeps this rank's share of the intermediate rows
(of both halves); ``down_proj`` the matching columns, summed. Two all-reduces per layer.
The LM head is vocabulary-parallel (its rows, gathered); embeddings and norms stay whole.
Each rank's KV cache holds its own KV heads (``model.config`` becomes the rank's view).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from livelm.layers.tensor_parallel import (
    AllReduceLinear,
    TensorParallelGroup,
    VocabParallelHead,
    keep_columns,
    keep_rows,
)
from livelm.models.llama import LlamaForCausalLM
from livelm.models.model_config import ModelConfig


def check_tensor_parallel(cfg: ModelConfig, world_size: int) -> None:
    """ValueError naming what stops ``cfg``'s model from being split over ``world_size``
    ranks (before anything is loaded)."""
    if world_size == 1:
        return
    if cfg.moe is not None:
        raise ValueError(f"tensor parallelism does not split mixture-of-experts models yet ({cfg.architecture})")
    if cfg.num_heads % world_size:
        raise ValueError(f"tensor_parallel_size={world_size} must divide the model's {cfg.num_heads} attention heads")
    kv = cfg.num_kv_heads
    if kv % world_size and world_size % kv:
        raise ValueError(f"tensor_parallel_size={world_size} and the model's {kv} KV heads must divide one another "
                         "(KV heads are split, or replicated when there are fewer than ranks)")
    if cfg.vocab_size % world_size:
        raise ValueError(f"tensor_parallel_size={world_size} must divide the model's vocabulary of "
                         f"{cfg.vocab_size} tokens (the LM head is split by vocabulary)")
    if cfg.intermediate_size % world_size:
        raise ValueError(f"tensor_parallel_size={world_size} must divide the model's intermediate size "
                         f"{cfg.intermediate_size}")


def rank_config(cfg: ModelConfig, world_size: int) -> ModelConfig:
    """The model's shape as one rank holds it (its heads, its share of the MLP)."""
    return dataclasses.replace(cfg, num_heads=cfg.num_heads // world_size,
                               num_kv_heads=max(1, cfg.num_kv_heads // world_size),
                               intermediate_size=cfg.intermediate_size // world_size)


def shard_model(model: LlamaForCausalLM, group: TensorParallelGroup) -> LlamaForCausalLM:
    """Keep ``group.rank``'s share of every layer of ``model`` (in place; before
    prepare_model packs anything) and return it."""
    cfg, rank, world = model.config, group.rank, group.world_size
    check_tensor_parallel(cfg, world)
    d = cfg.head_dim
    heads = cfg.num_heads // world
    kv_heads = max(1, cfg.num_kv_heads // world)
    # The first KV head of this rank's query heads (query head h reads KV head h // group).
    kv_first = rank * heads // (cfg.num_heads // cfg.num_kv_heads)
    q_size, kv_size = cfg.num_heads * d, cfg.num_kv_heads * d
    q_rows = (rank * heads * d, (rank + 1) * heads * d)
    k_rows = (q_size + kv_first * d, q_size + (kv_first + kv_heads) * d)
    v_rows = (q_size + kv_size + kv_first * d, q_size + kv_size + (kv_first + kv_heads) * d)
    inter = cfg.intermediate_size // world
    gate_rows = (rank * inter, (rank + 1) * inter)
    up_rows = (cfg.intermediate_size + rank * inter, cfg.intermediate_size + (rank + 1) * inter)
    for layer in model.layers:
        attn = layer.self_attn
        attn.qkv_proj = keep_rows(attn.qkv_proj, [q_rows, k_rows, v_rows])
        attn.o_proj = AllReduceLinear(keep_columns(attn.o_proj, *q_rows), group)
        attn.num_heads, attn.num_kv_heads = heads, kv_heads
        attn.q_size, attn.kv_size = heads * d, kv_heads * d
        mlp = layer.mlp
        mlp.gate_up_proj = keep_rows(mlp.gate_up_proj, [gate_rows, up_rows])
        mlp.down_proj = AllReduceLinear(keep_columns(mlp.down_proj, *gate_rows), group)
        mlp.intermediate = inter
    # The LM head is vocabulary-parallel: this rank's rows of the vocabulary (of the
    # embedding table when the two are tied; the embedding itself stays whole).
    vocab = cfg.vocab_size // world
    head = model.lm_head if model.lm_head is not None else _tied_head(model)
    model.lm_head = VocabParallelHead(keep_rows(head, [(rank * vocab, (rank + 1) * vocab)]), group)
    model.config = rank_config(cfg, world)
    return model


def _tied_head(model: LlamaForCausalLM) -> nn.Linear:
    """A float linear over the (float) embedding table: the tied head's weight."""
    table = model.embed_tokens.weight
    head = nn.Linear(table.shape[1], table.shape[0], bias=False, device=table.device, dtype=table.dtype)
    head.weight = table
    return head
