"""Attention of kv_policy "sinks" chunks (layers/attention/sinks.py): the torch path and the
C++ kernel (csrc/sinks_attention.cpp, also built AVX2-only) against attention written out
query by query over exactly the kept keys, rotated by their cache positions."""

from __future__ import annotations

import pytest
import torch

from livelm.kernels.build import KernelBuildUnavailable, compile_extension
from livelm.kernels.extensions import sinks_attention_kernels
from livelm.layers.attention.kv_format import decode_kv, encode_kv
from livelm.layers.attention.sinks import (
    sinks_attention,
    sinks_attention_kernel,
    sinks_segment,
)
from livelm.layers.rotary import apply_rotary as rotate

BLOCK = 16


def _tables(max_pos: int, half: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float32) / half))
    angles = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv)
    return angles.cos(), angles.sin()


def _case(sinks, window, start, n, heads, kv_heads, dim, half, kv_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = start + n
    num_blocks = total // BLOCK + 4
    perm = torch.randperm(num_blocks, generator=g).tolist()  # scattered blocks
    def slot_of(p: int) -> int:
        return perm[p // BLOCK] * BLOCK + p % BLOCK
    k_raw = torch.randn(kv_heads, num_blocks * BLOCK, dim, generator=g)
    v_raw = torch.randn(kv_heads, num_blocks * BLOCK, dim, generator=g)
    k_cache, v_cache = encode_kv(k_raw, kv_dtype), encode_kv(v_raw, kv_dtype)
    wide = torch.randn(n, heads * dim + 8, generator=g)
    q = wide[:, : heads * dim].view(n, heads, dim)
    cos, sin = _tables(sinks + 3 * window + n, half)
    seg = sinks_segment(sinks, window, 0, start, n, slot_of, lambda p: (cos[p], sin[p]), torch.device("cpu"))
    k_held, v_held = decode_kv(k_cache, torch.float32), decode_kv(v_cache, torch.float32)
    # The reference: query t sees sinks 0..S-1 and max(S, t-W+1)..t at cache positions 0..
    ref = torch.empty(n, heads, dim)
    group = heads // kv_heads
    for r in range(n):
        t = start + r
        keys = list(range(min(sinks, t + 1))) + list(range(max(sinks, t - window + 1), t + 1))
        pos = torch.arange(len(keys))
        slots = torch.tensor([slot_of(j) for j in keys])
        qt = rotate(q[r], cos[pos[-1]], sin[pos[-1]])
        kt = rotate(k_held[:, slots], cos[pos], sin[pos])  # [Hkv, L, D]
        for h in range(heads):
            scores = kt[h // group] @ qt[h] * 0.3
            ref[r, h] = torch.softmax(scores, -1) @ v_held[h // group, slots]
    return q, k_cache, v_cache, seg, ref.view(n, heads * dim)


CASES = [
    # sinks, window, start, n: first chunk, a chunk past the window, decodes, a chunk longer
    # than the window, no sinks, queries that are sinks themselves
    (4, 32, 0, 40), (4, 32, 100, 20), (4, 32, 300, 1), (4, 16, 50, 40), (0, 32, 90, 5), (4, 32, 2, 5),
    (20, 32, 70, 9),
]


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16, torch.uint8])
@pytest.mark.parametrize("shape", [(4, 2, 64, 32), (6, 2, 32, 8), (3, 3, 64, 16)])  # heads, kv, dim, half
def test_sinks_attention_matches_the_reference(kv_dtype, shape):
    heads, kv_heads, dim, half = shape  # half < dim / 2: partial rotary
    kernel = sinks_attention_kernels()
    for case in CASES:
        q, kc, vc, seg, ref = _case(*case, heads, kv_heads, dim, half, kv_dtype)
        out = torch.zeros(q.shape[0], heads * dim)
        sinks_attention(q, kc, vc, seg, 0.3, out)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
        if kernel is not None:
            wide = torch.zeros(q.shape[0], heads * dim + 8)
            sinks_attention_kernel(kernel, q, kc, vc, seg, 0.3, wide[:, : heads * dim])
            torch.testing.assert_close(wide[:, : heads * dim], ref, atol=2e-5, rtol=2e-5)
            assert torch.all(wide[:, heads * dim :] == 0)


def test_avx2_only_build_matches():
    try:
        kernel = compile_extension("livelm_sinks_attention_avx2", "sinks_attention.cpp",
                                   ("-mno-avx512f", "-ffp-contract=off"))
    except KernelBuildUnavailable:
        pytest.skip("no C++ compiler here")
    for case in CASES[:3]:
        q, kc, vc, seg, ref = _case(*case, 4, 2, 64, 32, torch.bfloat16)
        out = torch.zeros(q.shape[0], 4 * 64)
        sinks_attention_kernel(kernel, q, kc, vc, seg, 0.3, out)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
