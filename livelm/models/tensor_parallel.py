"""Splitting a loaded model over tensor-parallel ranks (Megatron-style).

Per layer: the fused q|k|v projection keeps this rank's query heads and their key/value
heads (split when there are at least as many KV heads as ranks, else each rank keeps the
one KV head its query heads share: replicated); ``o_proj`` keeps the matching input
columns and sums over the ranks; gate|up keeps this rank's share of the intermediate rows
(of both halves); ``down_proj`` the matching columns, summed. Two all-reduces per layer.

A mixture-of-experts layer keeps every routed expert's share of its intermediate rows
(gate and up, down's matching columns) and the shared expert's the same way; the router
and the shared expert's sigmoid gate stay whole (every rank routes the same input with the
same weights, so every rank picks the same experts). Each rank's block output is then a
partial sum (routed experts + gated shared expert) and one all-reduce per block sums it.

The token embedding and the LM head are vocabulary-parallel: each rank keeps its
vocab / world rows (a lookup sums the ranks' partial rows, the logits are gathered); a
tied head reads the rank's slice of the embedding table itself. Norms stay whole. Each
rank's KV cache holds its own KV heads (``model.config`` becomes the rank's view).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from livelm.layers.quantized import QuantEmbedding, QuantLinear
from livelm.layers.tensor_parallel import (
    AllReduceBlock,
    AllReduceLinear,
    TensorParallelGroup,
    VocabParallelEmbedding,
    VocabParallelHead,
    keep_columns,
    keep_rows,
)
from livelm.models.llama import MLP, LlamaForCausalLM
from livelm.models.model_config import ModelConfig
from livelm.models.moe import Experts, SparseMoeBlock


def check_tensor_parallel(cfg: ModelConfig, world_size: int) -> None:
    """ValueError naming what stops ``cfg``'s model from being split over ``world_size``
    ranks (before anything is loaded)."""
    if world_size == 1:
        return
    if cfg.num_heads % world_size:
        raise ValueError(f"tensor_parallel_size={world_size} must divide the model's {cfg.num_heads} attention heads")
    kv = cfg.num_kv_heads
    if kv % world_size and world_size % kv:
        raise ValueError(f"tensor_parallel_size={world_size} and the model's {kv} KV heads must divide one another "
                         "(KV heads are split, or replicated when there are fewer than ranks)")
    if cfg.vocab_size % world_size:
        raise ValueError(f"tensor_parallel_size={world_size} must divide the model's vocabulary of "
                         f"{cfg.vocab_size} tokens (the embedding and the LM head are split by vocabulary)")
    for field, size in _split_sizes(cfg).items():
        if size % world_size:
            raise ValueError(f"tensor_parallel_size={world_size} must divide the model's {field} {size} "
                             "(its intermediate rows are split over the ranks)")


def _split_sizes(cfg: ModelConfig) -> dict[str, int]:
    """The intermediate sizes the model's layers split, by their config.json field name."""
    moe = cfg.moe
    sizes: dict[str, int] = {}
    if _has_dense_layers(cfg):
        sizes["intermediate_size"] = cfg.intermediate_size
    if moe is not None and any(moe.sparse_layers):
        # Mixtral's config names its experts' size intermediate_size (it has no dense MLP).
        mixtral = cfg.architecture == "MixtralForCausalLM"
        sizes["intermediate_size" if mixtral else "moe_intermediate_size"] = moe.intermediate_size
        if moe.shared_intermediate_size:
            sizes["shared_expert_intermediate_size"] = moe.shared_intermediate_size
    return sizes


def _has_dense_layers(cfg: ModelConfig) -> bool:
    """Whether some layer of the model has the dense MLP (sized by ``intermediate_size``)."""
    return cfg.moe is None or not all(cfg.moe.sparse_layers)


def rank_config(cfg: ModelConfig, world_size: int) -> ModelConfig:
    """The model's shape as one rank holds it (its heads, its share of the MLPs and experts)."""
    moe = cfg.moe
    if moe is not None:
        moe = dataclasses.replace(moe, intermediate_size=moe.intermediate_size // world_size,
                                  shared_intermediate_size=moe.shared_intermediate_size // world_size)
    # A size no layer uses (Qwen-MoE's dense size in an all-sparse stack) stays as it is.
    inter = cfg.intermediate_size // world_size if _has_dense_layers(cfg) else cfg.intermediate_size
    return dataclasses.replace(cfg, num_heads=cfg.num_heads // world_size,
                               num_kv_heads=max(1, cfg.num_kv_heads // world_size),
                               intermediate_size=inter, moe=moe)


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
    for layer in model.layers:
        attn = layer.self_attn
        attn.qkv_proj = keep_rows(attn.qkv_proj, [q_rows, k_rows, v_rows])
        attn.o_proj = AllReduceLinear(keep_columns(attn.o_proj, *q_rows), group)
        attn.num_heads, attn.num_kv_heads = heads, kv_heads
        attn.q_size, attn.kv_size = heads * d, kv_heads * d
        if isinstance(layer.mlp, SparseMoeBlock):
            _shard_moe_block(layer.mlp, rank, world)
            layer.mlp = AllReduceBlock(layer.mlp, group)  # one all-reduce: routed + shared expert
        else:
            _shard_mlp(layer.mlp, rank, world)
            layer.mlp.down_proj = AllReduceLinear(layer.mlp.down_proj, group)
    # Vocabulary-parallel: this rank's rows of the embedding and of the LM head (a tied
    # head reads the rank's slice of the table, as the whole model's reads the whole one).
    vocab = cfg.vocab_size // world
    rows = (rank * vocab, (rank + 1) * vocab)
    embed = keep_rows(model.embed_tokens, [rows])
    head = _tied_head(embed) if cfg.tie_word_embeddings else keep_rows(model.lm_head, [rows])
    model.embed_tokens = VocabParallelEmbedding(embed, group, rows[0])
    model.lm_head = VocabParallelHead(head, group)
    model.config = rank_config(cfg, world)
    return model


def _shard_mlp(mlp: MLP, rank: int, world: int) -> None:
    """Keep this rank's share of a dense gated MLP's intermediate rows: gate|up's rows of
    both halves and down's matching columns (down's output is a partial sum then)."""
    whole = mlp.intermediate
    inter = whole // world
    gate_rows = (rank * inter, (rank + 1) * inter)
    mlp.gate_up_proj = keep_rows(mlp.gate_up_proj, [gate_rows, (whole + gate_rows[0], whole + gate_rows[1])])
    mlp.down_proj = keep_columns(mlp.down_proj, *gate_rows)
    mlp.intermediate = inter


def _shard_moe_block(block: SparseMoeBlock, rank: int, world: int) -> None:
    """Keep this rank's share of every routed expert and of the shared expert; the router
    and the shared expert's gate stay whole."""
    _shard_experts(block.experts, rank, world)
    if block.shared_expert is not None:
        _shard_mlp(block.shared_expert, rank, world)


def _shard_experts(experts: Experts, rank: int, world: int) -> None:
    """Each expert's gate and up rows [rank * I / world, (rank + 1) * I / world) and the
    matching columns of its down projection, stacked as before (models/moe.py's layout)."""
    e, i, h = experts.num_experts, experts.intermediate_size, experts.hidden_size
    inter = i // world
    mine = slice(rank * inter, (rank + 1) * inter)
    gate_up = experts.gate_up_proj.detach().view(e, 2, i, h)[:, :, mine].reshape(e * 2 * inter, h)
    down = experts.down_proj.detach()[:, mine]
    experts.gate_up_proj = nn.Parameter(gate_up.clone(), requires_grad=False)
    experts.down_proj = nn.Parameter(down.clone(memory_format=torch.contiguous_format), requires_grad=False)
    experts.intermediate_size = inter


def _tied_head(embed: nn.Module) -> nn.Module:
    """The tied LM head over this rank's slice of the embedding table, sharing it: a float
    linear whose weight is the table, or a quantized linear over the table's buffers."""
    if isinstance(embed, QuantEmbedding):
        head = QuantLinear(embed.in_features, embed.out_features, embed.fmt)
        head.share_weight(embed)
        return head
    table = embed.weight
    head = nn.Linear(table.shape[1], table.shape[0], bias=False, device=table.device, dtype=table.dtype)
    head.weight = table
    return head
