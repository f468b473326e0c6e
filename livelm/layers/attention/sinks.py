"""Attention of ``sinks`` requests (attention sinks + a rolling window, core/kv_policy.py).

Such a request's q and k leave the model unrotated (the runner gives its rows position 0,
an exact identity) and its keys are stored so in the cache. Here each query attends to
the sink tokens and the last ``window`` tokens, with rotary positions by place in the
cache, as StreamingLLM defines them: the sinks at 0 .. S-1, the window right after them.

Rotary is relative (a query at ``m`` and a key at ``n`` meet through ``m - n`` alone), so
the window's keys are rotated once per chunk by their text position minus a base (the
chunk's first window start minus S), and each query twice: by the same shifted text
position for the window's keys (equal, query by query, to the cache distance) and by its
own cache position for the sinks' keys. Every rotation stays below S + 2 * window, so a
stream can run forever without positions growing. Plain torch ops: what both attention
backends run for these rows (the C++ kernels serve ``full`` rows only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from livelm.layers.attention.kv_format import decode_kv, indexable
from livelm.layers.rotary import apply_rotary


@dataclass
class SinksSegment:
    """One sinks request's chunk: rows ``query_start .. + query_len`` of the batch.

    ``key_slots`` are the slots of its sink keys (the first ``num_sink_keys``), then of the
    window keys any of its queries sees; ``key_rope`` rotates those keys, ``window_rope``
    and ``sink_rope`` the queries (cos, sin [n, 1, half] for queries, [L, half] for keys);
    ``mask`` [n, L] is True where a query may attend; ``ranges`` [n, 3] says the same as
    key indices (the C++ kernel's form): sink keys ``0 .. ranges[r, 0]``, window keys
    ``ranges[r, 1] .. ranges[r, 2]``.
    """

    query_start: int
    query_len: int
    key_slots: torch.Tensor
    num_sink_keys: int
    key_rope: tuple[torch.Tensor, torch.Tensor]
    window_rope: tuple[torch.Tensor, torch.Tensor]
    sink_rope: tuple[torch.Tensor, torch.Tensor]
    mask: torch.Tensor
    ranges: torch.Tensor


def sinks_segment(
    num_sink_tokens: int,
    window: int,
    query_start: int,
    start: int,
    num_tokens: int,
    slot_of: Callable[[int], int],
    rope_table: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    floor: int = 0,
) -> SinksSegment:
    """The segment of a chunk at text positions ``start .. start + num_tokens - 1``.

    ``slot_of`` maps a text position to its cache slot (the request's logical block
    table), ``rope_table`` positions [N] to cos, sin [N, half] in the activations' dtype;
    no window reaches before ``floor`` (a recomputed request's, ``Request.kv_floor``).
    """
    s, end = num_sink_tokens, start + num_tokens
    num_sink_keys = min(s, end)
    low = max(s, floor)
    first = max(low, start - window + 1)  # the earliest window start of the chunk's queries
    base = first - s
    key_text = list(range(num_sink_keys)) + list(range(first, end))
    key_rot = list(range(num_sink_keys)) + [j - base for j in range(first, end)]
    slots = torch.tensor([slot_of(p) for p in key_text], dtype=torch.long, device=device)
    keys = torch.tensor(key_text, dtype=torch.long, device=device)
    t = torch.arange(start, end, device=device)
    win_start = torch.clamp(t - window + 1, min=low)
    mask = (keys[None, :] <= t[:, None]) & ((keys[None, :] < s) | (keys[None, :] >= win_start[:, None]))
    cache_pos = torch.where(t < s, t, s + t - win_start)
    lo = num_sink_keys + win_start - first
    ranges = torch.stack([torch.clamp(t + 1, max=num_sink_keys), lo,
                          torch.maximum(lo, num_sink_keys + t - first + 1)], dim=1).contiguous()
    kc, ks = rope_table(torch.tensor(key_rot, dtype=torch.long, device=device))
    wc, wsn = rope_table(t - base)
    sc, ssn = rope_table(cache_pos)
    return SinksSegment(query_start, num_tokens, slots, num_sink_keys, (kc, ks),
                        (wc[:, None], wsn[:, None]), (sc[:, None], ssn[:, None]), mask, ranges)


def _gather(cache: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """cache[:, slots] widened to ``dtype`` [Hkv, len(slots), D] (as the torch path gathers)."""
    rows = indexable(cache).index_select(1, slots)
    return decode_kv(rows.view(cache.dtype) if rows.dtype != cache.dtype else rows, dtype)


def sinks_attention_kernel(kernel, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           seg: SinksSegment, scale: float, out: torch.Tensor) -> None:
    """:func:`sinks_attention` through the C++ kernel module ``kernel``
    (``csrc/sinks_attention.cpp``: fp32 activations, a float32, bfloat16 or q8_0 cache)."""
    s, n = seg.query_start, seg.query_len
    kernel.sinks_attention(q[s : s + n], k_cache, v_cache, seg.key_slots, *seg.key_rope,
                           seg.window_rope[0][:, 0], seg.window_rope[1][:, 0],
                           seg.sink_rope[0][:, 0], seg.sink_rope[1][:, 0],
                           seg.ranges, seg.num_sink_keys, scale, out[s : s + n])


def sinks_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seg: SinksSegment,
                    scale: float, out: torch.Tensor) -> None:
    """The segment's rows of ``out`` [T, Hq * D] from unrotated q [T, Hq, D] and the cache
    (its new K/V already written)."""
    s, n = seg.query_start, seg.query_len
    _, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[0]
    group = num_heads // num_kv_heads
    keys = apply_rotary(_gather(k_cache, seg.key_slots, q.dtype), *seg.key_rope)  # [Hkv, L, D]
    values = _gather(v_cache, seg.key_slots, q.dtype)
    qs = q[s : s + n]
    # [n, Hq, D] -> [Hkv, G, n, D]: query heads sharing a KV head side by side.
    q_win = apply_rotary(qs, *seg.window_rope).view(n, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
    q_sink = apply_rotary(qs, *seg.sink_rope).view(n, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
    m = seg.num_sink_keys
    scores = torch.cat(
        [torch.matmul(q_sink, keys[:, None, :m].transpose(-1, -2)),
         torch.matmul(q_win, keys[:, None, m:].transpose(-1, -2))], dim=-1,
    ).float()
    scores.mul_(scale).masked_fill_(~seg.mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    o = torch.matmul(probs, values[:, None])  # [Hkv, G, n, D]
    out[s : s + n] = o.permute(2, 0, 1, 3).reshape(n, num_heads * head_dim)
