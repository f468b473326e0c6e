"""Sliding-window attention (Mistral, Qwen2 ...): the C++ decode and prefill kernels and the
torch path against plain attention under transformers' mask (the query at position p sees
the keys at positions p - window < j <= p), over caches whose blocks before the window are
released (the kernels must not read them: here they hold NaN); and with Gemma 2's soft-capped
scores (cap * tanh(score / cap) before the mask), alone and with a window."""

from __future__ import annotations

import pytest
import torch

from livelm.kernels.build import KernelBuildUnavailable, compile_extension
from livelm.kernels.extensions import decode_attention_kernels, prefill_attention_kernels
from livelm.layers.attention import (
    AttentionMetadata,
    CpuKernelAttention,
    PrefillSegment,
    TorchAttention,
)
from livelm.layers.attention.kv_format import decode_kv, encode_kv, indexable


def _kernel(build: str, native, name: str, source: str):  # noqa: ANN001, ANN202
    """The kernel module as built for this CPU, or an AVX2-only build of it (the path of
    CPUs without AVX-512; on such a CPU both are the same)."""
    if build == "native":
        kernel = native()
    else:
        try:
            kernel = compile_extension(name, source, ("-mno-avx512f",))
        except KernelBuildUnavailable:
            kernel = None
    if kernel is None:
        pytest.skip("no C++ compiler here")
    return kernel


@pytest.fixture(scope="module", params=["native", "avx2"])
def decode_kernel(request):  # noqa: ANN001, ANN201
    return _kernel(request.param, decode_attention_kernels, "livelm_decode_attention_avx2", "paged_attention.cpp")


@pytest.fixture(scope="module", params=["native", "avx2"])
def prefill_kernel(request):  # noqa: ANN001, ANN201
    return _kernel(request.param, prefill_attention_kernels, "livelm_prefill_attention_avx2", "prefill_attention.cpp")


def _reference(q, k_ctx, v_ctx, scale, q_positions, window, softcap=0.0):
    """Plain attention of queries at ``q_positions`` over a contiguous context, each seeing
    only its last ``window`` keys (itself included), scores soft-capped when ``softcap``."""
    group = q.shape[1] // k_ctx.shape[1]
    k = k_ctx.repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, L, D]
    v = v_ctx.repeat_interleave(group, dim=1).transpose(0, 1)
    scores = torch.einsum("thd,hld->htl", q, k) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    keys = torch.arange(k.shape[1])[None, :]
    mask = (keys <= q_positions[:, None]) & (keys > q_positions[:, None] - window)
    scores = scores.masked_fill(~mask[None], float("-inf"))
    return torch.einsum("htl,hld->thd", torch.softmax(scores, -1), v).reshape(q.shape[0], -1)


def _layout(g, lens, kv_heads, dim, block, num_blocks, kv_dtype, released, fill):
    """A cache of random K/V, one scattered block table per length, and the table's blocks
    wholly before ``released[i]`` (the first key any query of request i sees) pointed at a
    block filled with ``fill`` (what a released block holds: never to be read)."""
    k_cache = torch.randn(kv_heads, num_blocks * block, dim, generator=g)
    v_cache = torch.randn(kv_heads, num_blocks * block, dim, generator=g)
    dead = num_blocks - 1
    k_cache[:, dead * block :] = fill
    v_cache[:, dead * block :] = fill
    perm = torch.randperm(num_blocks - 1, generator=g).tolist()
    tables, used = [], 0
    for n, first_key in zip(lens, released, strict=True):
        nb = -(-n // block)
        table = perm[used : used + nb]
        used += nb
        tables.append([dead if (i + 1) * block <= first_key else b for i, b in enumerate(table)])
    return encode_kv(k_cache, kv_dtype), encode_kv(v_cache, kv_dtype), tables


def _slots(table, positions, block):
    return torch.tensor([table[p // block] * block + p % block for p in positions])


@pytest.mark.parametrize(("dim", "kv_dtype"), [
    (16, torch.float32), (48, torch.float32), (64, torch.float32), (128, torch.float32),
    (64, torch.bfloat16), (32, torch.uint8), (64, torch.uint8),
])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize(("window", "softcap"), [(1, 0.0), (5, 0.0), (16, 0.0), (17, 0.0), (40, 0.0),
                                                 (17, 1.5), (10**6, 1.5), (10**6, 0.0)])
def test_windowed_decode_kernel_matches_reference(decode_kernel, dim, kv_dtype, group, window, softcap):
    """The decode kernel with a window (AVX-512 for 16/64/128, the generic loops for 48 and
    q8_0): each row attends over its last ``window`` keys only, blocks before the window's
    first block are never read (NaN there would poison the output), the partial first block
    is masked key by key; ``softcap`` (window 10**6: none) caps scores before the mask."""
    kernel = decode_kernel
    kv_heads, block = 2, 16
    heads = kv_heads * group
    g = torch.Generator().manual_seed(dim * 100 + group * 10 + window % 1000)
    lens = [1, 5, 16, 17, 33, 64, 70, 131]
    firsts = [max(0, n - window) for n in lens]
    k_cache, v_cache, tables = _layout(g, lens, kv_heads, dim, block, 64, kv_dtype, firsts, float("nan"))
    k_held, v_held = decode_kv(k_cache, torch.float32), decode_kv(v_cache, torch.float32)
    maxb = max(len(t) for t in tables)
    table_t = torch.tensor([t + [0] * (maxb - len(t)) for t in tables])
    q = torch.randn(len(lens), heads, dim, generator=g)
    out = torch.zeros(len(lens), heads, dim)
    kernel.paged_decode_attention_out(q, k_cache, v_cache, table_t, torch.tensor(lens), block, 0.3, out, window,
                                      softcap)
    assert torch.isfinite(out).all()
    for i, n in enumerate(lens):
        keys = range(firsts[i], n)
        s = _slots(tables[i], keys, block)
        ref = _reference(q[i : i + 1], k_held[:, s].transpose(0, 1), v_held[:, s].transpose(0, 1), 0.3,
                         torch.tensor([n - 1 - firsts[i]]), window, softcap)
        torch.testing.assert_close(out[i].reshape(1, -1), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("dim", "kv_dtype"), [(16, torch.float32), (64, torch.float32), (64, torch.bfloat16),
                                               (32, torch.uint8)])
@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize(("window", "softcap"), [(1, 0.0), (7, 0.0), (24, 0.0), (100, 0.0), (24, 2.0),
                                                 (10**6, 2.0)])
def test_windowed_prefill_kernel_matches_reference(prefill_kernel, dim, kv_dtype, group, window, softcap):
    """The prefill kernel with a window over chunks of 1..300 queries at position 0 or after
    earlier context (tiles wider than the window, so whole key blocks are hidden from some
    of a tile's queries), released blocks holding NaN: equal to plain windowed attention
    (soft-capped by ``softcap``; window 10**6: none)."""
    kernel = prefill_kernel
    kv_heads, block = 2, 16
    heads = kv_heads * group
    g = torch.Generator().manual_seed(dim * 100 + group * 10 + window % 1000)
    for ctx, n in [(0, 1), (0, 37), (0, 300), (5, 1), (17, 16), (250, 3), (33, 300), (1000, 64)]:
        first = max(0, ctx - window + 1)  # the first key the chunk's first query sees
        k_cache, v_cache, (table,) = _layout(g, [ctx + n], kv_heads, dim, block, 100, kv_dtype, [first],
                                             float("nan"))
        k_held, v_held = decode_kv(k_cache, torch.float32), decode_kv(v_cache, torch.float32)
        q = torch.randn(n, heads, dim, generator=g)
        out = torch.zeros(n, heads * dim)
        kernel.prefill_attention(q, k_cache, v_cache, _slots(table, range(ctx + n), block), out, dim**-0.5, window,
                                 softcap)
        assert torch.isfinite(out).all(), (ctx, n)
        s = _slots(table, range(first, ctx + n), block)
        ref = _reference(q, k_held[:, s].transpose(0, 1), v_held[:, s].transpose(0, 1), dim**-0.5,
                         torch.arange(ctx - first, ctx - first + n), window, softcap)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("softcap", [None, 1.5])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16, torch.uint8])
@pytest.mark.parametrize("backend_name", ["cpu", "torch"])
def test_mixed_batch_with_a_window_on_both_backends(backend_name, kv_dtype, softcap):
    """A step of decodes and prefill chunks through each backend, as a sliding layer calls
    it (``meta.window`` set, its window passed) and as a global layer of the same model
    does (no window): each equals plain attention under its own mask. Released blocks hold
    finite garbage here: the torch path reads them (masked), as the runner arranges. With a
    ``softcap`` (Gemma 2), every case's scores are capped before the mask."""
    dim, heads, kv_heads, block, window = 32, 4, 2, 4, 6
    if backend_name == "cpu":
        decode, prefill = decode_attention_kernels(), prefill_attention_kernels()
        if decode is None or prefill is None:
            pytest.skip("no C++ compiler here")
        backend = CpuKernelAttention(decode, prefill)
    else:
        backend = TorchAttention()
    g = torch.Generator().manual_seed(3)
    decode_lens = [1, 6, 7, 30]
    prefill = [(0, 3), (0, 13), (9, 6), (30, 1), (40, 20)]
    lens = decode_lens + [c + n for c, n in prefill]
    firsts = [max(0, n - window) for n in decode_lens] + [max(0, c - window + 1) for c, _ in prefill]
    for window_of_layer in (window, None):
        released = firsts if window_of_layer else [0] * len(lens)
        k_cache, v_cache, tables = _layout(g, lens, kv_heads, dim, block, 80, kv_dtype, released, 1e3)
        num_new = len(decode_lens) + sum(n for _, n in prefill)
        q = torch.randn(num_new, heads, dim, generator=g)
        k = torch.randn(num_new, kv_heads, dim, generator=g)
        v = torch.randn(num_new, kv_heads, dim, generator=g)
        slot_mapping = [_slots(tables[i], [n - 1], block) for i, n in enumerate(decode_lens)]
        segments, row = [], len(decode_lens)
        for j, (ctx, n) in enumerate(prefill):
            t = tables[len(decode_lens) + j]
            slot_mapping.append(_slots(t, range(ctx, ctx + n), block))
            segments.append(PrefillSegment(row, n, None if ctx == 0 else _slots(t, range(ctx + n), block), None))
            row += n
        maxb = max(len(t) for t in tables[: len(decode_lens)])
        meta = AttentionMetadata(
            slot_mapping=torch.cat(slot_mapping), num_decodes=len(decode_lens),
            decode_block_tables=torch.tensor([t + [0] * (maxb - len(t)) for t in tables[: len(decode_lens)]]),
            decode_lens=torch.tensor(decode_lens), block_size=block, prefills=segments, backend=backend,
            window=window,
        )
        backend.prepare(meta, torch.float32)
        out = backend.forward(q, k, v, k_cache, v_cache, meta, 0.25, window_of_layer, softcap)
        kc, vc = decode_kv(k_cache, torch.float32), decode_kv(v_cache, torch.float32)
        w = window_of_layer or 10**9
        row = 0
        for i, n in enumerate(decode_lens + [None] * len(prefill)):
            if n is None:
                ctx, m = prefill[i - len(decode_lens)]
                positions = torch.arange(ctx, ctx + m)
            else:
                ctx, m, positions = n - 1, 1, torch.tensor([n - 1])
            s = _slots(tables[i], range(ctx + m), block)
            ref = _reference(q[row : row + m], kc[:, s].transpose(0, 1), vc[:, s].transpose(0, 1), 0.25, positions, w,
                             softcap or 0.0)
            torch.testing.assert_close(out[row : row + m], ref, atol=1e-5, rtol=1e-5)
            row += m
        assert torch.equal(indexable(k_cache)[:, meta.slot_mapping],
                           indexable(encode_kv(k.transpose(0, 1), kv_dtype)))
