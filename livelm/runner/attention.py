"""Attention over a paged KV cache, in plain torch (CPU and CUDA).

The flat batch holds decode tokens first (one per request), then prefill chunks (a run of
tokens per request, possibly continuing earlier context). Each layer's cache is a pair of
tensors shaped [num_kv_heads, num_slots, head_dim]: head-major, so the context gathered
for one (request, head) is a contiguous [context, head_dim] matrix that batched matmuls
read without copies. A token at position p of a request lives in slot
``block_ids[p // block_size] * block_size + p % block_size``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PrefillSegment:
    """One request's chunk of ``query_len`` tokens, rows ``query_start..`` of the batch.

    ``context_slots`` lists the slots of all its keys (earlier context and this chunk),
    or is None when the chunk starts at position 0 and attends only to itself.
    """

    query_start: int
    query_len: int
    context_slots: torch.Tensor | None
    causal_mask: torch.Tensor | None  # [query_len, context] bool, True = may attend


@dataclass
class AttentionMetadata:
    """Where to write this step's K/V and what each query attends to."""

    slot_mapping: torch.Tensor  # [T] slot of each new token
    num_decodes: int
    decode_block_tables: torch.Tensor | None  # [D, max_blocks] int64
    decode_lens: torch.Tensor | None  # [D] int64 context length (the new token included)
    block_size: int
    prefills: list[PrefillSegment]
    # Set for the torch fallback only (the C++ kernel reads the block tables in place):
    decode_slots: torch.Tensor | None = None  # [D, Lmax] context slots of each decoding request
    decode_bias: torch.Tensor | None = None  # [1, D, 1, Lmax] float: 0 for real keys, -inf for padding
    decode_kernel: object | None = None  # the compiled kernel module when it applies
    # The compiled prefill kernel (fp32 CPU, head_dim % 16 == 0): it reads K/V through the
    # slots in place and masks from positions, so segments then need no causal_mask.
    prefill_kernel: object | None = None


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store new K/V [T, Hkv, D] into their slots."""
    k_cache.index_copy_(1, slot_mapping, k.transpose(0, 1))
    v_cache.index_copy_(1, slot_mapping, v.transpose(0, 1))


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention for a mixed batch. q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq * D].

    The new k/v are written to the cache first, so every query reads its whole context
    (earlier chunks included) from one place.
    """
    if meta.prefill_kernel is not None:  # a plain row copy; index_copy_ over strided k/v is ~10x slower
        meta.prefill_kernel.write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    else:
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    out = torch.empty(num_tokens, num_heads * head_dim, dtype=q.dtype, device=q.device)

    d = meta.num_decodes
    if d and meta.decode_kernel is not None:
        # Reads q in place (rows of the fused qkv output) and writes straight into out. A
        # decode-only step (single-stream decode) needs no slices: each costs a few us.
        whole = d == num_tokens
        qd = q if whole else q[:d]
        if qd.stride(2) != 1 or qd.stride(1) != head_dim:
            qd = qd.contiguous()
        meta.decode_kernel.paged_decode_attention_out(
            qd, k_cache, v_cache, meta.decode_block_tables, meta.decode_lens,
            meta.block_size, scale, (out if whole else out[:d]).view(d, num_heads, head_dim),
        )
    elif d:
        # Query heads sharing a KV head ride along the "query length" axis, so GQA needs
        # no repeated K/V, and everything stays KV-head-major like the cache:
        # [Hkv, D, G, hd] x [Hkv, D, L, hd] -> [Hkv, D, G, L].
        slots = meta.decode_slots
        qd = q[:d].view(d, num_kv_heads, group, head_dim).transpose(0, 1)
        kd = gather_slots(k_cache, slots.view(-1)).view(num_kv_heads, d, -1, head_dim)
        vd = gather_slots(v_cache, slots.view(-1)).view(num_kv_heads, d, -1, head_dim)
        scores = torch.matmul(qd, kd.transpose(-1, -2))
        scores.mul_(scale).add_(meta.decode_bias)
        probs = torch.softmax(scores, dim=-1)
        od = torch.matmul(probs, vd)  # [Hkv, D, G, hd]
        out[:d] = od.transpose(0, 1).reshape(d, num_heads * head_dim)

    for seg in meta.prefills:
        s, n = seg.query_start, seg.query_len
        if meta.prefill_kernel is not None:
            # A chunk at position 0 sees only itself: its slots are its own rows' slots.
            slots = seg.context_slots if seg.context_slots is not None else meta.slot_mapping[s : s + n]
            meta.prefill_kernel.prefill_attention(q[s : s + n], k_cache, v_cache, slots, out[s : s + n], scale)
            continue
        # 4-D inputs: 3-D ones send torch's CPU SDPA down a ~20x slower path.
        qs = q[s : s + n].transpose(0, 1)[None]  # [1, Hq, n, hd]
        if seg.context_slots is None:
            ks, vs = k[s : s + n].transpose(0, 1)[None], v[s : s + n].transpose(0, 1)[None]
            os = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=group > 1)
        else:
            ks = gather_slots(k_cache, seg.context_slots)[None]
            vs = gather_slots(v_cache, seg.context_slots)[None]
            mask = seg.causal_mask
            if mask is None:
                ctx = seg.context_slots.shape[0]
                keys = torch.arange(ctx, device=q.device)
                mask = keys[None, :] <= torch.arange(ctx - n, ctx, device=q.device)[:, None]
            os = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=group > 1)
        out[s : s + n] = os[0].transpose(0, 1).reshape(n, num_heads * head_dim)
    return out


def gather_slots(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache[:, slots] via index_select (advanced indexing is ~10x slower on CPU)."""
    return cache.index_select(1, slots)
