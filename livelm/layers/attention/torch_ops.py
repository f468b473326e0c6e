"""Attention over the paged KV cache in plain torch ops: the reference path, what CUDA runs
today, and the fallback of the CPU kernels' backend for every case they do not cover."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from livelm.layers.attention.kv_format import decode_kv, encode_kv, indexable
from livelm.layers.attention.metadata import AttentionMetadata, PrefillSegment
from livelm.layers.attention.sinks import sinks_attention


class TorchAttention:
    """The ``torch`` attention backend: gathers context K/V by slot, batched matmuls for
    decodes, SDPA for prefill chunks. Any device and dtype."""

    name = "torch"

    def prepare(self, meta: AttentionMetadata, dtype: torch.dtype) -> None:
        """Decode gather slots and padding bias, and prefill causal masks (once per step)."""
        add_decode_gather(meta, dtype)
        add_causal_masks(meta)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        """Attention for a mixed batch. q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq * D];
        ``window``: the layer's sliding window (``meta.window``), None for a global layer;
        ``softcap``: the scores' soft cap (Gemma 2), None for none.

        The new k/v are written to the cache first, so every query reads its whole context
        (earlier chunks included) from one place.
        """
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        num_tokens, num_heads, head_dim = q.shape
        out = torch.empty(num_tokens, num_heads * head_dim, dtype=q.dtype, device=q.device)
        if meta.num_decodes:
            decode_attention(q, k_cache, v_cache, meta, scale, out, window, softcap)
        for seg in meta.prefills:
            prefill_attention(q, k, v, k_cache, v_cache, seg, scale, out, window, softcap)
        for sseg in meta.sinks:  # kv_policy "sinks" requests (layers/attention/sinks.py)
            sinks_attention(q, k_cache, v_cache, sseg, scale, out)
        return out


def add_decode_gather(meta: AttentionMetadata, dtype: torch.dtype) -> None:
    """Set ``meta.decode_slots`` and ``meta.decode_bias`` (in ``dtype``) for :func:`decode_attention`,
    and ``meta.decode_window_bias`` for sliding layers when some row reaches past its window."""
    if not meta.num_decodes:
        return
    table, lens, bs = meta.decode_block_tables, meta.decode_lens, meta.block_size
    offsets = torch.arange(table.shape[1] * bs, device=table.device)
    slots = table[:, offsets // bs] * bs + offsets % bs
    past_end = offsets[None, :] >= lens[:, None]
    # Positions past a row's length are masked, but their slots hold whatever the cache
    # held (it is not zero-filled; NaN * 0 is NaN): point them at the row's first slot,
    # which is always written.
    meta.decode_slots = torch.where(past_end, slots[:, :1], slots)
    bias = torch.zeros(meta.num_decodes, table.shape[1] * bs, dtype=dtype, device=table.device)
    bias.masked_fill_(past_end, float("-inf"))
    meta.decode_bias = bias[None, :, None, :]
    meta.decode_window_bias = None
    w = meta.window
    if w is not None and int(lens.max()) > w:
        # The query at position len - 1 sees keys > len - 1 - w. Rows of a request that
        # released blocks point those blocks' keys at a kept block (runner): masked here.
        before = offsets[None, :] < (lens - w)[:, None]
        meta.decode_window_bias = bias.masked_fill(before, float("-inf"))[None, :, None, :]


def add_causal_masks(meta: AttentionMetadata) -> None:
    """Give each prefill segment that continues earlier context its causal mask, and each
    segment whose queries reach past the sliding window (``meta.window``) its window mask."""
    w = meta.window
    for seg in meta.prefills:
        ctx = seg.query_len if seg.context_slots is None else seg.context_slots.shape[0]
        device = meta.slot_mapping.device
        if seg.context_slots is not None and seg.causal_mask is None:
            seg.causal_mask = _causal_mask(ctx, seg.query_len, device)
        if w is not None and ctx > w and seg.window_mask is None:
            seg.window_mask = _window_mask(ctx, seg.query_len, w, device)


def _causal_mask(ctx: int, n: int, device: torch.device) -> torch.Tensor:
    keys = torch.arange(ctx, device=device)
    return keys[None, :] <= torch.arange(ctx - n, ctx, device=device)[:, None]


def _window_mask(ctx: int, n: int, window: int, device: torch.device) -> torch.Tensor:
    """[n, ctx]: the query at position ctx - n + i sees the keys j with p - window < j <= p
    (transformers' sliding-window mask: the last ``window`` tokens, itself included)."""
    keys = torch.arange(ctx, device=device)[None, :]
    pos = torch.arange(ctx - n, ctx, device=device)[:, None]
    return (keys <= pos) & (keys > pos - window)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store new K/V [T, Hkv, D] into their slots, in the cache's format (layers/attention/kv_format.py)."""
    for cache, new in ((k_cache, k), (v_cache, v)):
        indexable(cache).index_copy_(1, slot_mapping, indexable(encode_kv(new.transpose(0, 1), cache.dtype)))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                     scale: float, out: torch.Tensor, window: int | None = None,
                     softcap: float | None = None) -> None:
    """Rows ``:num_decodes`` of ``out``, over ``meta.decode_slots`` / ``decode_bias``
    (``decode_window_bias`` for a sliding layer, when set), scores soft-capped by ``softcap``."""
    # Query heads sharing a KV head ride along the "query length" axis, so GQA needs no
    # repeated K/V, and everything stays KV-head-major like the cache:
    # [Hkv, D, G, hd] x [Hkv, D, L, hd] -> [Hkv, D, G, L].
    d = meta.num_decodes
    _, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[0]
    slots = meta.decode_slots
    bias = meta.decode_window_bias if window is not None and meta.decode_window_bias is not None else meta.decode_bias
    qd = q[:d].view(d, num_kv_heads, num_heads // num_kv_heads, head_dim).transpose(0, 1)
    kd = gather_slots(k_cache, slots.view(-1), q.dtype).view(num_kv_heads, d, -1, head_dim)
    vd = gather_slots(v_cache, slots.view(-1), q.dtype).view(num_kv_heads, d, -1, head_dim)
    scores = torch.matmul(qd, kd.transpose(-1, -2))
    scores.mul_(scale)
    if softcap is not None:
        scores = soft_cap(scores, softcap)
    scores.add_(bias)
    probs = torch.softmax(scores, dim=-1)
    od = torch.matmul(probs, vd)  # [Hkv, D, G, hd]
    out[:d] = od.transpose(0, 1).reshape(d, num_heads * head_dim)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, seg: PrefillSegment, scale: float, out: torch.Tensor,
                      window: int | None = None, softcap: float | None = None) -> None:
    """One prefill chunk's rows of ``out`` (SDPA; causal over itself, or masked over its
    context; a sliding layer's ``window`` masks what lies before each query's window;
    with a ``softcap``, explicit scores, which SDPA cannot cap)."""
    s, n = seg.query_start, seg.query_len
    _, num_heads, head_dim = q.shape
    group = num_heads // k.shape[1]
    # 4-D inputs: 3-D ones send torch's CPU SDPA down a ~20x slower path.
    qs = q[s : s + n].transpose(0, 1)[None]  # [1, Hq, n, hd]
    ctx = n if seg.context_slots is None else seg.context_slots.shape[0]
    mask = None
    if window is not None and ctx > window:
        mask = seg.window_mask if seg.window_mask is not None else _window_mask(ctx, n, window, q.device)
    if seg.context_slots is None:
        ks, vs = k[s : s + n].transpose(0, 1)[None], v[s : s + n].transpose(0, 1)[None]
        if k_cache.dtype != q.dtype:  # attend to what the cache holds, as later chunks will
            ks = decode_kv(encode_kv(ks, k_cache.dtype), q.dtype)
            vs = decode_kv(encode_kv(vs, v_cache.dtype), q.dtype)
        if softcap is not None:
            mask = _causal_mask(n, n, q.device) if mask is None else mask
            os = _capped_attention(qs, ks, vs, mask, scale, softcap)
        else:
            os = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=mask is None, scale=scale,
                                                enable_gqa=group > 1)
    else:
        ks = gather_slots(k_cache, seg.context_slots, q.dtype)[None]
        vs = gather_slots(v_cache, seg.context_slots, q.dtype)[None]
        if mask is None:
            mask = seg.causal_mask
        if mask is None:
            mask = _causal_mask(ctx, n, q.device)
        if softcap is not None:
            os = _capped_attention(qs, ks, vs, mask, scale, softcap)
        else:
            os = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=group > 1)
    out[s : s + n] = os[0].transpose(0, 1).reshape(n, num_heads * head_dim)


def soft_cap(scores: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(scores / cap), in place, in transformers' order of operations."""
    return scores.div_(cap).tanh_().mul_(cap)


def _capped_attention(qs: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor, mask: torch.Tensor,
                      scale: float, cap: float) -> torch.Tensor:
    """Attention with soft-capped scores: qs [1, Hq, n, D], ks/vs [1, Hkv, ctx, D], ``mask``
    [n, ctx] True where a key is seen -> [1, Hq, n, D]."""
    group = qs.shape[1] // ks.shape[1]
    if group > 1:
        ks, vs = ks.repeat_interleave(group, dim=1), vs.repeat_interleave(group, dim=1)
    scores = soft_cap(torch.matmul(qs, ks.transpose(-1, -2)).mul_(scale), cap)
    scores.masked_fill_(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), vs)


def gather_slots(cache: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """cache[:, slots] widened to ``dtype`` [Hkv, len(slots), D], via index_select
    (advanced indexing is ~10x slower on CPU)."""
    rows = indexable(cache).index_select(1, slots)
    return decode_kv(rows.view(cache.dtype) if rows.dtype != cache.dtype else rows, dtype)
