"""The ``cpu`` attention backend: livelm's C++ decode and prefill kernels (fp32 on CPU),
reading K/V in place through the block tables and slots.

Each case falls back to the torch path on its own: decodes when the decode module could not
be built, prefill chunks (and the cache write) when the prefill module could not, or the
head dim is not a multiple of 16.
"""

from __future__ import annotations

from types import ModuleType

import torch

from livelm.kernels.extensions import sinks_attention_kernels
from livelm.layers.attention.metadata import AttentionMetadata
from livelm.layers.attention.sinks import sinks_attention, sinks_attention_kernel
from livelm.layers.attention.torch_ops import (
    add_causal_masks,
    add_decode_gather,
    decode_attention,
    prefill_attention,
    write_kv,
)


class CpuKernelAttention:
    """Decodes through ``decode`` (``paged_decode_attention_out``), prefill chunks and the
    K/V write through ``prefill`` (``prefill_attention``, ``write_kv``); None for either
    takes the torch path for that case."""

    name = "cpu"

    def __init__(self, decode: ModuleType | None, prefill: ModuleType | None) -> None:
        self.decode = decode
        self.prefill = prefill

    def prepare(self, meta: AttentionMetadata, dtype: torch.dtype) -> None:
        """The torch path's extras, for the cases without a kernel (the prefill kernel masks
        from positions, so its segments need no causal mask)."""
        if self.decode is None:
            add_decode_gather(meta, dtype)
        if self.prefill is None:
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
        ``window``: the layer's sliding window (the kernels skip the blocks before it);
        ``softcap``: the scores' soft cap, None for none.

        The new k/v are written to the cache first, so every query reads its whole context
        (earlier chunks included) from one place.
        """
        prefill = self.prefill
        if prefill is not None:  # a plain row copy; index_copy_ over strided k/v is ~10x slower
            prefill.write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        else:
            write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        num_tokens, num_heads, head_dim = q.shape
        out = torch.empty(num_tokens, num_heads * head_dim, dtype=q.dtype, device=q.device)

        d = meta.num_decodes
        if d and self.decode is not None:
            # Reads q in place (rows of the fused qkv output) and writes straight into out. A
            # decode-only step (single-stream decode) needs no slices: each costs a few us.
            whole = d == num_tokens
            qd = q if whole else q[:d]
            if qd.stride(2) != 1 or qd.stride(1) != head_dim:
                qd = qd.contiguous()
            self.decode.paged_decode_attention_out(
                qd, k_cache, v_cache, meta.decode_block_tables, meta.decode_lens,
                meta.block_size, scale, (out if whole else out[:d]).view(d, num_heads, head_dim), window or 0,
                softcap or 0.0,
            )
        elif d:
            decode_attention(q, k_cache, v_cache, meta, scale, out, window, softcap)

        for seg in meta.prefills:
            if prefill is not None:
                s, n = seg.query_start, seg.query_len
                # A chunk at position 0 sees only itself: its slots are its own rows' slots.
                slots = seg.context_slots if seg.context_slots is not None else meta.slot_mapping[s : s + n]
                prefill.prefill_attention(q[s : s + n], k_cache, v_cache, slots, out[s : s + n], scale, window or 0,
                                          softcap or 0.0)
                continue
            prefill_attention(q, k, v, k_cache, v_cache, seg, scale, out, window, softcap)
        if meta.sinks:  # kv_policy "sinks" requests (layers/attention/sinks.py)
            # Built on first use: most engines never serve such a request.
            kernel = sinks_attention_kernels() if q.dtype == torch.float32 else None
            for sseg in meta.sinks:
                if kernel is not None:
                    sinks_attention_kernel(kernel, q, k_cache, v_cache, sseg, scale, out)
                else:
                    sinks_attention(q, k_cache, v_cache, sseg, scale, out)
        return out
