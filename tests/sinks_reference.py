"""The attention-sinks oracle in plain torch: a whole-sequence forward of a transformers
model in which the query at text position t attends to exactly the tokens StreamingLLM
keeps (the first S, and the last W up to t) with rotary positions by place in the cache
(sinks 0..S-1, then the window). A key's K is computed once from its own layer input, as
a KV cache holds it, so one forward over the whole sequence is what a stream computes."""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import rotate_half


def kept(t: int, sinks: int, window: int, floor: int = 0) -> list[int]:
    """Text positions the query at ``t`` sees."""
    start = max(sinks, t - window + 1, floor)
    return [j for j in range(min(sinks, t + 1))] + list(range(start, t + 1))


def _rot(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rot_dim = cos.shape[-1]
    x1, x2 = x[..., :rot_dim], x[..., rot_dim:]
    return torch.cat([x1 * cos + rotate_half(x1) * sin, x2], dim=-1)


@torch.inference_mode()
def sinks_logits(hf, token_ids: list[int], sinks: int, window: int, floor: int = 0) -> torch.Tensor:
    """log-softmax [T, vocab] of ``token_ids`` under the sinks policy (S = ``sinks``, W = ``window``);
    with ``floor``, as a request recomputed from what it kept (no window reaches before
    ``floor``; rows between the sinks and ``floor`` are then meaningless)."""
    model = hf.model
    cfg = hf.config
    n = len(token_ids)
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    x = model.embed_tokens(torch.tensor([token_ids]))
    positions = torch.arange(sinks + window + 1)[None]
    cos, sin = model.rotary_emb(x, positions)  # [1, P, rot_dim]
    cos, sin = cos[0], sin[0]
    for layer in model.layers:
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).view(n, heads, head_dim)
        k = attn.k_proj(h).view(n, kv_heads, head_dim)
        v = attn.v_proj(h).view(n, kv_heads, head_dim)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        out = torch.empty(n, heads, head_dim)
        group = heads // kv_heads
        for t in range(n):
            keys = kept(t, sinks, window, floor)
            if not keys:  # a row between no sinks and the floor: never read
                out[t] = 0
                continue
            cache_pos = torch.arange(len(keys))  # sinks first, then the window, in order
            qt = _rot(q[t], cos[cache_pos[-1]], sin[cache_pos[-1]])  # [H, D]
            kt = _rot(k[keys], cos[cache_pos][:, None], sin[cache_pos][:, None])  # [L, Hkv, D]
            vt = v[keys]
            kt = kt.repeat_interleave(group, dim=1)
            vt = vt.repeat_interleave(group, dim=1)
            scores = torch.einsum("hd,lhd->hl", qt, kt) * attn.scaling
            out[t] = torch.einsum("hl,lhd->hd", torch.softmax(scores, -1), vt)
        x = x + attn.o_proj(out.view(1, n, heads * head_dim))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    logits = hf.lm_head(model.norm(x))[0].float()
    return torch.log_softmax(logits, dim=-1)
