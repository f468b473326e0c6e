"""Decoder-only transformer of the Llama family (Llama 2/3, Mistral, SmolLM2, Qwen2, Qwen3,
Phi-3, Gemma 2/3).

The families differ only in options read from their config: q/k/v bias (Qwen2), per-head
q/k RMSNorm (Qwen3), tied embeddings, head_dim, RoPE scaling, partial rotary (Phi-4-mini),
sliding-window layers (Mistral, Qwen2 with use_sliding_window) and a mixture-of-experts
feed-forward (models/moe.py: Qwen2-MoE, Qwen3-MoE, Mixtral). Gemma adds norms that scale by
1 + weight, GeGLU, scaled embeddings, a norm after attention and two around the MLP
("sandwich" norms), soft-capped attention scores and logits (Gemma 2), and its own rotary
for the sliding layers (Gemma 3).
Phi-3's checkpoints store q|k|v and gate|up already fused, in this module's layout. Projections that read the
same input are fused (q|k|v, gate|up) so each layer does two big matmuls instead of five.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from livelm.layers.attention import AttentionMetadata
from livelm.layers.fused_ops import (
    add_rms_norm,
    gelu_tanh_and_mul,
    rms_norm,
    rotary_inplace,
    silu_and_mul,
)
from livelm.models.model_config import ModelConfig
from livelm.models.moe import SparseMoeBlock
from livelm.models.rope import RotaryEmbedding, apply_rotary, rotary_dim


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in fp32 as transformers does; it scales by
    ``offset + weight`` (Gemma's norms: offset 1, weights stored as checkpoints hold them)."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.offset = offset

    def scale(self) -> torch.Tensor:
        """What the normalized rows are multiplied by. Gemma's 1 + weight is added per call,
        not folded into the weight at load, so weight updates need no special case (and the
        fp32 sum is the one transformers computes)."""
        return self.weight + self.offset if self.offset else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize the last dimension."""
        return rms_norm(x, self.scale(), self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``residual + x`` normalized, and that sum (the new residual); may reuse both inputs."""
        return add_rms_norm(x, residual, self.scale(), self.eps)


class Attention(nn.Module):
    """Self-attention with fused q/k/v projection over the paged KV cache; layer ``index``
    slides when the config gives it a window (its queries see only their last ``window``
    keys, themselves included)."""

    def __init__(self, cfg: ModelConfig, index: int = 0) -> None:
        super().__init__()
        self.window = cfg.window_of(index)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.norm_offset) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.norm_offset) if cfg.qk_norm else None
        self.scale = cfg.attention_scale
        self.softcap = cfg.attn_softcap
        # The fused in-place kernel rotates whole heads; partial rotary takes apply_rotary.
        self.full_rotary = rotary_dim(cfg.head_dim, cfg.rope_of(index)) == cfg.head_dim

    def forward(
        self,
        rope: tuple[torch.Tensor, torch.Tensor],
        x: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]; ``rope`` holds this step's cos/sin tables."""
        t = x.shape[0]
        qkv = self.qkv_proj.forward(x)
        # q and k rotated in place inside the fused output when a kernel applies.
        rotated = self.q_norm is None and self.full_rotary and rotary_inplace(qkv, *rope, self.num_heads + self.num_kv_heads, self.head_dim)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm.forward(q), self.k_norm.forward(k)
        if not rotated:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        out = meta.backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, self.window, self.softcap)
        return self.o_proj.forward(out)


class MLP(nn.Module):
    """Gated feed-forward (SwiGLU, or GeGLU for Gemma) with fused gate|up projection."""

    def __init__(self, cfg: ModelConfig, intermediate_size: int | None = None) -> None:
        super().__init__()
        self.intermediate = intermediate_size or cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * self.intermediate, bias=False)
        self.down_proj = nn.Linear(self.intermediate, cfg.hidden_size, bias=False)
        self.act_and_mul = gelu_tanh_and_mul if cfg.activation == "gelu_tanh" else silu_and_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]."""
        return self.down_proj.forward(self.act_and_mul(self.gate_up_proj.forward(x)))


class DecoderLayer(nn.Module):
    """Pre-norm attention block followed by a pre-norm MLP block; with the config's
    ``sandwich_norms`` (Gemma), ``post_attention_layernorm`` normalizes the attention output
    and ``pre_feedforward_layernorm`` / ``post_feedforward_layernorm`` wrap the MLP."""

    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)  # noqa: E731
        self.input_layernorm = norm()
        self.self_attn = Attention(cfg, index)
        self.post_attention_layernorm = norm()
        self.sandwich = cfg.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        # Gemma 3: the sliding layers rotate by their own tables.
        self.local_rope = cfg.local_rope is not None and cfg.window_of(index) is not None
        moe = cfg.moe
        if moe is not None and moe.sparse_layers[index]:
            shared = MLP(cfg, moe.shared_intermediate_size) if moe.shared_intermediate_size else None
            self.mlp: nn.Module = SparseMoeBlock(cfg.hidden_size, moe, shared)
        else:
            self.mlp = MLP(cfg)

    def forward(self, rope, x, residual, kv_cache, meta) -> tuple[torch.Tensor, torch.Tensor]:
        """One transformer layer. The residual stream is carried apart from the layer's
        output (``residual`` is None at the first layer), so that each residual add fuses
        with the norm that follows it: returns (this layer's MLP output, residual)."""
        if residual is None:
            residual, h = x, self.input_layernorm.forward(x)
        else:
            h, residual = self.input_layernorm.add_forward(x, residual)
        h = self.self_attn.forward(rope, h, kv_cache, meta)
        if self.sandwich:
            h = self.post_attention_layernorm.forward(h)
            h, residual = self.pre_feedforward_layernorm.add_forward(h, residual)
            return self.post_feedforward_layernorm.forward(self.mlp.forward(h)), residual
        h, residual = self.post_attention_layernorm.add_forward(h, residual)
        return self.mlp.forward(h), residual


class LlamaForCausalLM(nn.Module):
    """The whole model: embeddings, layers, final norm and the LM head."""

    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.config = cfg
        self.rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope)
        self.local_rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.local_rope) if cfg.local_rope else None
        # Left uninitialized (the loader fills every weight): a random init of the
        # embedding under torch.device("meta") would load torch's decompositions, ~1.4 s.
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states [T, hidden] of a flat batch of tokens.

        Submodules are run through ``.forward``, not ``__call__``: a decode step makes ~300
        such calls, and skipping nn.Module's hook machinery made single-stream decode ~5%
        faster (measured, A/B in one process). Hooks on submodules therefore do not fire.
        """
        x = self.embed_tokens.forward(input_ids)
        if self.config.embedding_scale is not None:
            # As transformers: the scale rounded to the weights' dtype first.
            x = x * torch.tensor(self.config.embedding_scale, dtype=x.dtype)
        rope = self.rotary.tables(positions, x.dtype)
        local = self.local_rotary.tables(positions, x.dtype) if self.local_rotary is not None else rope
        residual = None
        for layer, kv in zip(self.layers, kv_caches, strict=True):
            x, residual = layer.forward(local if layer.local_rope else rope, x, residual, kv, meta)
        return self.norm.forward(x) if residual is None else self.norm.add_forward(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits [N, vocab] for the selected hidden rows (soft-capped where the
        model caps them: Gemma 2)."""
        if self.lm_head is not None:  # whatever linear type it was swapped for
            logits = self.lm_head(hidden).float()
        else:
            logits = F.linear(hidden, self.embed_tokens.weight).float()
        cap = self.config.final_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits
