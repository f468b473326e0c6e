"""int8 activations (livelm/quant/int8_activations.py, csrc/int8_linear.cpp): the activation
quantizer's bounds, and every kernel path (native, AVX2-only and scalar builds; the row
kernels and the GEMM at every tile edge) against an exact integer reference."""

from __future__ import annotations

import pytest
import torch

from livelm.kernels.extensions import build_int8_linear_kernels, int8_linear_kernels
from livelm.layers.quantized import QuantLinear
from livelm.quant import int8_activations
from livelm.quant.formats import FORMAT_CODES, dequantize, quantize
from livelm.quant.int8_activations import (
    INT8_ACTIVATION_FORMATS,
    int8_linear,
    int8_matmul_reference,
    quantize_activations,
)

# Row counts around the row kernels' tiles (up to 4 rows of x by 2-4 weight rows), the
# switches to the GEMM (gemm_min_rows: 5, 6 or 10 rows) and its tiles (6 rows on AVX512-VNNI, 3 on AVX2) and
# 128 KiB sweeps of x (K = 1536: 84 rows).
KERNEL_MS = [1, 2, 3, 4, 5, 6, 7, 9, 10, 12, 13, 19, 20, 64, 100, 131]


def _compiled():
    ext = int8_linear_kernels()
    if ext is None:
        pytest.skip("the C++ int8-activation kernels could not be built here")
    return ext


@pytest.fixture(scope="module", params=["native", "avx2", "scalar"])
def ext_build(request):
    """The kernels as compiled for this CPU, an AVX2-only build (the path of CPUs without
    AVX-512: vpmaddubsw) where this CPU has more, and a build without AVX2 (scalar loops)."""
    ext = _compiled()
    if request.param == "avx2":
        if ext.simd() == "avx2":
            pytest.skip("the native build is already avx2")
        ext = build_int8_linear_kernels("livelm_int8_linear_avx2", ("-mno-avx512f",))
        assert ext.simd() == "avx2"
    elif request.param == "scalar":
        ext = build_int8_linear_kernels("livelm_int8_linear_scalar", ("-mno-avx2", "-mno-fma", "-mno-f16c"))
        assert ext.simd() == "scalar"
    return ext


def _weight(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[0, :32] = 0.0  # an all-zero block (scale 0)
    return w


def _activations(m: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 3
    x[0, :32] = 0.0  # an all-zero block: its scale is 0
    if m > 1 and k > 32:
        x[1, 32:64] *= 1e6  # a huge block: its own scale, its neighbours' untouched
    return x


def test_quantized_activations_are_within_half_a_step(ext_build) -> None:
    x = _activations(7, 96, 0)
    xq, xd, xs = ext_build.quantize_activations(x)
    assert xq.dtype == torch.int8 and xd.shape == xs.shape == (7, 3)
    blocks = x.reshape(7, 3, 32)
    q = xq.reshape(7, 3, 32).float()
    assert q.abs().max() <= 127
    assert torch.equal(xd, blocks.abs().amax(-1) / 127) or torch.allclose(xd, blocks.abs().amax(-1) / 127, rtol=1e-6)
    err = (q * xd[..., None] - blocks).abs()
    assert (err <= 0.5 * xd[..., None] * (1 + 1e-5)).all()
    nonzero = xd > 0
    assert (q.abs().amax(-1)[nonzero] == 127).all()  # each block's largest element maps to +-127
    assert (q[0, 0] == 0).all() and xd[0, 0] == 0 and xs[0, 0] == 0
    torch.testing.assert_close(xs, xd * q.sum(-1), rtol=1e-6, atol=0)
    # Equal to the torch quantizer (round half to even) except where x / dx lands within
    # rounding of a tie.
    ref_q, ref_d, _ = _torch_quantized(x)
    assert (q - ref_q.reshape(7, 3, 32).float()).abs().max() <= 1
    assert (q != ref_q.reshape(7, 3, 32).float()).float().mean() < 0.01
    torch.testing.assert_close(xd, ref_d, rtol=1e-6, atol=0)


def _torch_quantized(x: torch.Tensor):
    saved = int8_activations.int8_linear_kernels
    int8_activations.int8_linear_kernels = lambda: None
    try:
        return quantize_activations(x)
    finally:
        int8_activations.int8_linear_kernels = saved


@pytest.mark.parametrize("fmt", INT8_ACTIVATION_FORMATS)
def test_kernels_equal_the_integer_reference_at_every_m(ext_build, fmt: str) -> None:
    """The C++ matmul at every row count against sum_b dw dx I + c xs with the block sums I
    exact (float64 for the rest): only fp32 rounding of the scaled sums may differ."""
    for n, k in [(45, 160), (70, 576), (33, 32)]:
        qt = quantize(_weight(n, k, 7), fmt)
        for bias in (torch.randn(n), None):
            for m in KERNEL_MS:
                xq, xd, xs = ext_build.quantize_activations(_activations(m, k, m))
                got = ext_build.int8_matmul(xq, xd, xs, qt.qs, qt.d, qt.m, bias, FORMAT_CODES[fmt])
                want = int8_matmul_reference(xq, xd, xs, qt, bias)
                scale = want.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)  # per row: row 1 is huge
                assert float(((got.double() - want).abs() / scale).max()) < 2e-6, (n, k, m)


def test_gemm_sweeps_x_in_chunks() -> None:
    """More rows than one 128 KiB sweep of x holds at K = 1536 (84 rows), every panel ragged."""
    ext = _compiled()
    qt = quantize(_weight(70, 1536, 3), "q4_1")
    xq, xd, xs = ext.quantize_activations(torch.randn(300, 1536))
    got = ext.int8_matmul(xq, xd, xs, qt.qs, qt.d, qt.m, None, FORMAT_CODES["q4_1"])
    want = int8_matmul_reference(xq, xd, xs, qt)
    assert float((got.double() - want).abs().max() / want.abs().max()) < 2e-6


@pytest.mark.parametrize("fmt", INT8_ACTIVATION_FORMATS)
def test_int8_linear_is_close_to_fp32_activations(fmt: str) -> None:
    """The rounding of x costs about 0.5% of the output's scale (random data), on the compiled
    path and the torch fallback alike."""
    qt = quantize(_weight(64, 256, 1), fmt)
    x = torch.randn(9, 256)
    exact = x @ dequantize(qt).T
    got = int8_linear(x, qt)
    saved = int8_activations.int8_linear_kernels
    int8_activations.int8_linear_kernels = lambda: None
    try:
        fallback = int8_linear(x, qt)
    finally:
        int8_activations.int8_linear_kernels = saved
    for out in (got, fallback):
        assert float((out - exact).abs().max() / exact.abs().max()) < 2e-2
    assert float((got - fallback).abs().max() / exact.abs().max()) < 1e-5


def test_quant_linear_takes_int8_activations_when_told() -> None:
    """QuantLinear's own dispatch (the cached kernel arguments), batched 3-D input and bf16."""
    lin = QuantLinear(128, 40, "q4_0", bias=True)
    qt = quantize(_weight(40, 128, 2), "q4_0")
    lin.qs.copy_(qt.qs), lin.d.copy_(qt.d)
    torch.nn.init.normal_(lin.bias)
    x = torch.randn(2, 5, 128)
    fp32 = lin(x)
    lin.int8_activations = True
    got = lin(x)
    xq, xd, xs = quantize_activations(x.reshape(10, 128))
    want = int8_matmul_reference(xq, xd, xs, qt, lin.bias.detach()).float().reshape(2, 5, 40)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.equal(got, fp32)  # the activations really were rounded
    assert lin(x.bfloat16()).dtype == torch.bfloat16


def test_bad_formats_and_shapes_are_named() -> None:
    ext = _compiled()
    qt = quantize(_weight(8, 64, 0), "q5_0")
    with pytest.raises(ValueError, match=r"int8 activations need q8_0, q4_0, q4_1 weights, not q5_0"):
        int8_linear(torch.randn(2, 64), qt)
    q8 = quantize(_weight(8, 64, 0), "q8_0")
    with pytest.raises(RuntimeError, match="K divisible by 32"):
        ext.quantize_activations(torch.randn(2, 48))
    xq, xd, xs = ext.quantize_activations(torch.randn(2, 64))
    with pytest.raises(RuntimeError, match="support q8_0, q4_0 and q4_1"):
        ext.int8_matmul(xq, xd, xs, q8.qs, q8.d, None, None, FORMAT_CODES["int8"])
    with pytest.raises(RuntimeError, match=r"xd and xs must be contiguous fp32 \[M, K/32\]"):
        ext.int8_matmul(xq, xd[:1], xs, q8.qs, q8.d, None, None, FORMAT_CODES["q8_0"])
    with pytest.raises(RuntimeError, match="qs must be contiguous int8"):
        ext.int8_matmul(xq, xd, xs, quantize(_weight(8, 64, 0), "q4_0").qs, q8.d, None, None, FORMAT_CODES["q8_0"])
