"""Paged attention: the C++ decode and prefill kernels and the torch paths against plain attention."""

from __future__ import annotations

import pytest
import torch

from livelm.config import ATTENTION_BACKEND_CHOICES
from livelm.kernels.extensions import decode_attention_kernels, prefill_attention_kernels
from livelm.layers.attention import (
    ATTENTION_BACKENDS,
    AttentionMetadata,
    CpuKernelAttention,
    PrefillSegment,
    TorchAttention,
    select_attention_backend,
)
from livelm.layers.attention.kv_format import decode_kv, encode_kv, indexable

# Every KV cache storage type (uint8: q8_0 rows; layers/attention/kv_format.py).
KV_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.uint8, torch.float8_e4m3fn]
# Those the C++ kernels read in place (q8_0 needs a head_dim divisible by 32).
KERNEL_KV_DTYPES = [torch.float32, torch.bfloat16, torch.uint8]


def _reference(q, k_ctx, v_ctx, scale, q_positions):
    """Plain causal attention of queries at q_positions over a contiguous context."""
    group = q.shape[1] // k_ctx.shape[1]
    k = k_ctx.repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, L, D]
    v = v_ctx.repeat_interleave(group, dim=1).transpose(0, 1)
    scores = torch.einsum("thd,hld->htl", q, k) * scale
    mask = torch.arange(k.shape[1])[None, :] <= q_positions[:, None]
    scores = scores.masked_fill(~mask[None], float("-inf"))
    return torch.einsum("htl,hld->thd", torch.softmax(scores, -1), v).reshape(q.shape[0], -1)


def _setup(seed, lens, heads=6, kv_heads=2, dim=16, block=4, num_blocks=200):
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(kv_heads, num_blocks * block, dim, generator=g)
    v_cache = torch.randn(kv_heads, num_blocks * block, dim, generator=g)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, used = [], 0
    for n in lens:
        nb = -(-n // block)
        tables.append(perm[used : used + nb])
        used += nb
    return k_cache, v_cache, tables, g


def _slots(table, positions, block):
    return torch.tensor([table[p // block] * block + p % block for p in positions])


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("backend_name", ["cpu", "torch"])
def test_mixed_batch_decodes_and_chunked_prefills(backend_name, kv_dtype):
    """Both backends over a cache of each KV format: attention equals plain attention over
    what the cache holds (K/V rounded or quantized to its format), and the cache holds the
    new K/V byte for byte as ``kv_format.encode_kv`` writes them (so the C++ write rounds
    and quantizes exactly as the torch path does)."""
    dim = 32 if kv_dtype == torch.uint8 else 16
    if backend_name == "cpu" and kv_dtype not in KERNEL_KV_DTYPES:
        with pytest.raises(ValueError, match="float32, bfloat16 or q8_0"):
            select_attention_backend("cpu", torch.device("cpu"), torch.float32, dim, kv_dtype)
        return
    backend = select_attention_backend(backend_name, torch.device("cpu"), torch.float32, dim, kv_dtype)
    if backend.name != backend_name:
        pytest.skip("no C++ compiler here: the torch path is tested below")
    heads, kv_heads, block = 6, 2, 4
    decode_lens = [1, 5, 17, 33]  # context incl. the new token
    prefill = [(0, 7), (9, 6), (30, 1)]  # (tokens already cached, chunk length)
    lens = decode_lens + [c + n for c, n in prefill]
    k_cache, v_cache, tables, g = _setup(0, lens, heads, kv_heads, dim, block)
    k_cache, v_cache = encode_kv(k_cache, kv_dtype), encode_kv(v_cache, kv_dtype)
    # Context K/V that is already in the cache stays; the new tokens' K/V come in k/v.
    num_new = len(decode_lens) + sum(n for _, n in prefill)
    q = torch.randn(num_new, heads, dim, generator=g)
    k = torch.randn(num_new, kv_heads, dim, generator=g)
    v = torch.randn(num_new, kv_heads, dim, generator=g)
    slot_mapping, segments, row = [], [], len(decode_lens)
    for i, n in enumerate(decode_lens):
        slot_mapping.append(_slots(tables[i], [n - 1], block))
    for j, (ctx, n) in enumerate(prefill):
        t = tables[len(decode_lens) + j]
        slot_mapping.append(_slots(t, range(ctx, ctx + n), block))
        if ctx == 0:
            segments.append(PrefillSegment(row, n, None, None))
        else:
            pos = torch.arange(ctx + n)
            mask = pos[None, :] <= torch.arange(ctx, ctx + n)[:, None]
            segments.append(PrefillSegment(row, n, _slots(t, range(ctx + n), block), mask))
        row += n
    maxb = max(len(t) for t in tables[: len(decode_lens)])
    table_t = torch.tensor([t + [0] * (maxb - len(t)) for t in tables[: len(decode_lens)]])
    lens_t = torch.tensor(decode_lens)
    meta = AttentionMetadata(
        slot_mapping=torch.cat(slot_mapping), num_decodes=len(decode_lens), decode_block_tables=table_t,
        decode_lens=lens_t, block_size=block, prefills=segments, backend=backend,
    )
    backend.prepare(meta, torch.float32)
    kc, vc = k_cache.clone(), v_cache.clone()
    out = backend.forward(q, k, v, kc, vc, meta, 0.25)

    # Reference: write the new K/V, then plain attention over each request's contiguous context.
    kc_want, vc_want = k_cache.clone(), v_cache.clone()
    indexable(kc_want)[:, meta.slot_mapping] = indexable(encode_kv(k.transpose(0, 1), kv_dtype))
    indexable(vc_want)[:, meta.slot_mapping] = indexable(encode_kv(v.transpose(0, 1), kv_dtype))
    kc_ref, vc_ref = decode_kv(kc_want, torch.float32), decode_kv(vc_want, torch.float32)
    row = 0
    for i, n in enumerate(decode_lens):
        s = _slots(tables[i], range(n), block)
        ref = _reference(q[row : row + 1], kc_ref[:, s].transpose(0, 1), vc_ref[:, s].transpose(0, 1), 0.25,
                         torch.tensor([n - 1]))
        torch.testing.assert_close(out[row : row + 1], ref, atol=1e-5, rtol=1e-5)
        row += 1
    for j, (ctx, n) in enumerate(prefill):
        s = _slots(tables[len(decode_lens) + j], range(ctx + n), block)
        ref = _reference(q[row : row + n], kc_ref[:, s].transpose(0, 1), vc_ref[:, s].transpose(0, 1), 0.25,
                         torch.arange(ctx, ctx + n))
        torch.testing.assert_close(out[row : row + n], ref, atol=1e-5, rtol=1e-5)
        row += n
    # The cache now holds the new K/V exactly where the slot mapping says, in its format
    # (the C++ write's rounding and q8_0 quantization equal the torch path's).
    assert kc.dtype == kv_dtype
    assert torch.equal(indexable(kc), indexable(kc_want)) and torch.equal(indexable(vc), indexable(vc_want))


@pytest.mark.parametrize(("dim", "kv_dtype"), [
    *((dim, kv) for kv in (torch.float32, torch.bfloat16) for dim in (16, 48, 64, 128)),
    *((dim, torch.uint8) for dim in (32, 64, 96, 128)),  # q8_0: head_dim % 32 == 0
])
@pytest.mark.parametrize("group", [1, 3, 5])
def test_decode_kernel_matches_reference(dim, group, kv_dtype):
    """The C++ decode kernel (the AVX-512 path for head dims 16..256 in steps of 16 it was
    compiled for, the generic one for 48 and for q8_0 rows) against plain attention over
    what the cache holds: contexts of 1..70 keys (ragged tails of 4- and 16-key steps),
    scattered blocks, one and several requests, q and out as strided rows of wider tensors
    like the model's fused QKV."""
    kernel = decode_attention_kernels()
    if kernel is None:
        pytest.skip("no C++ compiler here")
    kv_heads, block = 2, 16
    heads = kv_heads * group
    for lens in ([1], [70], [5, 16, 17, 33, 64]):
        k_cache, v_cache, tables, g = _setup(dim + group, lens, heads, kv_heads, dim, block, num_blocks=64)
        k_cache, v_cache = encode_kv(k_cache, kv_dtype), encode_kv(v_cache, kv_dtype)
        k_held, v_held = decode_kv(k_cache, torch.float32), decode_kv(v_cache, torch.float32)
        maxb = max(len(t) for t in tables)
        table_t = torch.tensor([t + [0] * (maxb - len(t)) for t in tables])
        wide = torch.randn(len(lens), heads * dim + 8, generator=g)
        q = wide[:, : heads * dim].view(len(lens), heads, dim)
        out_wide = torch.zeros(len(lens), heads * dim + 8)
        out = out_wide[:, : heads * dim].view(len(lens), heads, dim)
        kernel.paged_decode_attention_out(q, k_cache, v_cache, table_t, torch.tensor(lens), block, 0.3, out, 0, 0.0)
        for i, n in enumerate(lens):
            s = _slots(tables[i], range(n), block)
            ref = _reference(q[i : i + 1], k_held[:, s].transpose(0, 1), v_held[:, s].transpose(0, 1), 0.3,
                             torch.tensor([n - 1]))
            torch.testing.assert_close(out[i].reshape(1, -1), ref, atol=1e-5, rtol=1e-5)
        assert torch.all(out_wide[:, heads * dim :] == 0)  # nothing written past each row's heads


@pytest.mark.parametrize(("dim", "kv_dtype"), [
    (16, torch.float32), (64, torch.float32), (16, torch.bfloat16), (64, torch.bfloat16),
    (32, torch.uint8), (64, torch.uint8),
])
@pytest.mark.parametrize("group", [1, 2, 3])
def test_prefill_kernel_matches_sdpa(group, dim, kv_dtype):
    """The C++ prefill kernel against the torch path (SDPA over gathered K/V) on chunks of
    1..300 queries, at position 0 or after contexts that end mid-block, two per batch, with
    queries read from a strided fused-QKV view as the model passes them."""
    kernel = prefill_attention_kernels()
    if kernel is None:
        pytest.skip("no C++ compiler here")
    kv_heads, block = 3, 16
    heads = kv_heads * group
    g = torch.Generator().manual_seed(100 * group + dim)
    cases = [(0, 1), (0, 37), (0, 300), (5, 1), (17, 16), (250, 3), (33, 300), (300, 129), (1000, 64)]
    for (ctx0, n0), (ctx1, n1) in zip(cases, cases[1:] + cases[:1], strict=True):
        lens = [ctx0 + n0, ctx1 + n1]
        k_cache, v_cache, tables, _ = _setup(len(lens) + ctx0 + ctx1, lens, heads, kv_heads, dim, block, num_blocks=200)
        k_cache, v_cache = encode_kv(k_cache, kv_dtype), encode_kv(v_cache, kv_dtype)
        num_new = n0 + n1
        qkv = torch.randn(num_new, (heads + 2 * kv_heads) * dim, generator=g)
        q = qkv[:, : heads * dim].view(num_new, heads, dim)  # strided rows, like the model's
        k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(num_new, kv_heads, dim)
        v = qkv[:, (heads + kv_heads) * dim :].view(num_new, kv_heads, dim)
        slot_mapping, segments, row = [], [], 0
        for t, (ctx, n) in zip(tables, [(ctx0, n0), (ctx1, n1)], strict=True):
            slot_mapping.append(_slots(t, range(ctx, ctx + n), block))
            ctx_slots = None if ctx == 0 else _slots(t, range(ctx + n), block)
            segments.append(PrefillSegment(row, n, ctx_slots, None))
            row += n
        outs, caches = [], []
        for backend in (CpuKernelAttention(None, kernel), TorchAttention()):
            meta = AttentionMetadata(
                slot_mapping=torch.cat(slot_mapping), num_decodes=0, decode_block_tables=None, decode_lens=None,
                block_size=block, prefills=segments, backend=backend,
            )
            caches.append((k_cache.clone(), v_cache.clone()))
            outs.append(backend.forward(q, k, v, *caches[-1], meta, dim**-0.5))
        torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
        # The kernel's write_kv (strided k/v rows) stores exactly what index_copy_ does.
        assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])


def test_backends_are_chosen_by_configuration():
    """``auto`` is the C++ kernels for fp32 on CPU and torch ops elsewhere; ``cpu`` refuses
    what its kernels never run; every backend name is a valid EngineConfig value."""
    assert ATTENTION_BACKEND_CHOICES == ("auto", *ATTENTION_BACKENDS)
    cpu, fp32 = torch.device("cpu"), torch.float32
    want = "cpu" if decode_attention_kernels() or prefill_attention_kernels() else "torch"
    assert select_attention_backend("auto", cpu, fp32, 64).name == want
    assert select_attention_backend("auto", cpu, torch.bfloat16, 64).name == "torch"
    assert select_attention_backend("auto", torch.device("cuda"), fp32, 64).name == "torch"
    assert select_attention_backend("torch", cpu, fp32, 64).name == "torch"
    # The kernels read a bfloat16 cache in place; a float16 one takes the torch path.
    assert select_attention_backend("auto", cpu, fp32, 64, torch.bfloat16).name == want
    assert select_attention_backend("auto", cpu, fp32, 64, torch.float16).name == "torch"
    with pytest.raises(ValueError, match="fp32 on CPU"):
        select_attention_backend("cpu", cpu, torch.bfloat16, 64)
    with pytest.raises(ValueError, match="valid: auto, cpu, torch"):
        select_attention_backend("flash", cpu, fp32, 64)
    backend = select_attention_backend("cpu", cpu, fp32, 24)  # head dim not a multiple of 16
    if isinstance(backend, CpuKernelAttention):
        assert backend.prefill is None


def test_q8_0_rows_without_f16c_match_the_torch_format():
    """The q8_0 write and read without F16C instructions (the software float16 conversions
    of kv_types.h, which CPUs without F16C use): the cache bytes equal the torch path's for
    scales across float16's whole range (subnormal, ties between two float16 values,
    overflow to inf), and prefill attention over them equals the torch path's."""
    from livelm.kernels.build import KernelBuildUnavailable, compile_extension

    try:
        kernel = compile_extension("livelm_prefill_attention_nof16c", "prefill_attention.cpp", ("-mno-f16c",))
    except KernelBuildUnavailable:
        pytest.skip("no C++ compiler here")
    g = torch.Generator().manual_seed(7)
    n, dim = 4096, 64
    x = torch.randn(n, 1, dim, generator=g)
    # Each row's first block peaks at 127 * d for a d spread over float16's range, and at
    # exact midpoints between neighbouring float16 values (round half to even).
    d = 10 ** (torch.rand(n, generator=g) * 14 - 9)
    halves = torch.arange(1, 0x7BFF, dtype=torch.int32)[torch.randint(0, 0x7BFE, (n,), generator=g)]
    lo = halves.to(torch.int16).view(torch.float16).float()
    hi = (halves + 1).to(torch.int16).view(torch.float16).float()
    d = torch.where(torch.arange(n) % 2 == 0, d, (lo + hi) / 2)
    x[:, 0, :32] = x[:, 0, :32].clamp(-1, 1) * d[:, None] * 127
    x[:, 0, 0] = d * 127
    kc = torch.zeros(1, n, dim + 4, dtype=torch.uint8)
    vc = torch.zeros_like(kc)
    kernel.write_kv(kc, vc, x, x, torch.arange(n))
    want = encode_kv(x.transpose(0, 1), torch.uint8)
    assert torch.equal(kc, want) and torch.equal(vc, want)
    # Read back: a prefill chunk attending over these rows, against the torch path.
    q = torch.randn(64, 1, dim, generator=g)
    k, v = torch.randn(64, 1, dim, generator=g), torch.randn(64, 1, dim, generator=g)
    k_cache = encode_kv(torch.randn(1, 512, dim, generator=g), torch.uint8)
    v_cache = encode_kv(torch.randn(1, 512, dim, generator=g), torch.uint8)
    slots = torch.arange(448, 512)
    seg = PrefillSegment(0, 64, torch.arange(512), None)
    outs = []
    for backend in (CpuKernelAttention(None, kernel), TorchAttention()):
        meta = AttentionMetadata(slot_mapping=slots, num_decodes=0, decode_block_tables=None, decode_lens=None,
                                 block_size=16, prefills=[seg], backend=backend)
        backend.prepare(meta, torch.float32)
        outs.append(backend.forward(q, k, v, k_cache.clone(), v_cache.clone(), meta, dim**-0.5))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
