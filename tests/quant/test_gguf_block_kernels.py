"""GGUF's raw block formats (q5_0, q5_1, q4_k, q5_k, q6_k) against gguf-py's reference
dequantization: the kept bytes, the torch and C++ dequantization (bit-exact), and every
matmul path (decode and batched row counts) in each build of the kernels this CPU runs."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from kquant_reference import quantize as reference_quantize

from livelm.kernels.extensions import build_quant_linear_kernels
from livelm.quant import matmul
from livelm.quant.formats import (
    FORMAT_CODES,
    QuantizedTensor,
    bytes_per_weight,
    dequantize,
    quantize,
)
from livelm.quant.gguf_blocks import RAW_LAYOUTS
from livelm.quant.gguf_repack import repack_gguf_tensor

Q = gguf.GGMLQuantizationType
RAW = list(RAW_LAYOUTS)
# Row counts around every path switch: the AVX2 tiles (4 rows of x), the dispatcher's
# FUSED_MAX_ROWS_AVX2 (48), the AVX-512 GEMM (from 20, 32-row panels) and column panels (128).
KERNEL_MS = [1, 2, 3, 4, 5, 7, 12, 13, 20, 33, 48, 49, 64, 127, 128, 131, 300]


def _blocks(fmt: str, n: int, k: int, seed: int) -> tuple[QuantizedTensor, torch.Tensor]:
    """A weight [n, k] in ``fmt`` made by the reference quantizer, and gguf-py's fp32 of it."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * 0.08).astype(np.float32)
    w[0, : RAW_LAYOUTS[fmt][0]] = 0.0  # an all-zero block (scale 0)
    w[-1, -RAW_LAYOUTS[fmt][0] :] = np.abs(w[-1, -RAW_LAYOUTS[fmt][0] :])  # all positive: min > 0
    raw = reference_quantize(w, Q[fmt.upper()])
    ref = torch.from_numpy(gguf.quants.dequantize(raw, Q[fmt.upper()]).reshape(n, k))
    qt = repack_gguf_tensor(raw, fmt.upper(), (n, k))
    assert isinstance(qt, QuantizedTensor) and qt.fmt == fmt
    return qt, ref


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


@pytest.fixture(params=["compiled", "fallback"])
def path(request, monkeypatch) -> str:
    """The compiled kernels, then the pure-torch fallback (no compiler)."""
    if request.param == "compiled":
        if matmul.quant_linear_kernels() is None:
            pytest.skip("the C++ quantized kernels could not be built here")
    else:
        monkeypatch.setattr(matmul, "quant_linear_kernels", lambda: None)
    return request.param


@pytest.mark.parametrize("fmt", RAW)
def test_blocks_are_kept_byte_for_byte(fmt: str) -> None:
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((5, 512)) * 0.08).astype(np.float32)
    raw = reference_quantize(w, Q[fmt.upper()])
    qt = repack_gguf_tensor(raw, fmt.upper(), (5, 512))
    assert qt.tensors().keys() == {"qs"} and qt.qs.dtype == torch.uint8
    assert np.array_equal(qt.qs.numpy(), raw)
    assert qt.nbytes == 5 * 512 * bytes_per_weight(fmt)


@pytest.mark.parametrize("fmt", RAW)
def test_reference_quantizer_is_close(fmt: str) -> None:
    """The test's own K-quant quantizer gives weights near the originals (so the model tests
    run on meaningful weights): error within one quantization step of each block."""
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((9, 512)) * 0.08).astype(np.float32)
    got = gguf.quants.dequantize(reference_quantize(w, Q[fmt.upper()]), Q[fmt.upper()])
    levels = {"q4_k": 15, "q5_k": 31, "q6_k": 31, "q5_0": 16, "q5_1": 31}[fmt]
    assert np.abs(got - w).max() <= 2 * np.abs(w).max() / levels


@pytest.mark.parametrize("fmt", ["q5_0", "q5_1"])
def test_q5_quantizer_is_gguf_bit_exact(fmt: str) -> None:
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((37, 96)) * 0.05).astype(np.float32)
    w[0, :32] = 0.0
    ours = quantize(torch.from_numpy(w), fmt)
    assert np.array_equal(ours.qs.numpy(), gguf.quants.quantize(w, Q[fmt.upper()]))


@pytest.mark.parametrize("fmt", RAW)
def test_dequantization_is_bit_exact(path: str, fmt: str) -> None:
    qt, ref = _blocks(fmt, 50, 512, 4)
    assert torch.equal(dequantize(qt), ref)  # torch ops, always
    assert torch.equal(matmul.dequantize_rows(qt, 10, 17), ref[10:27])
    ids = torch.tensor([[3, 49, 3], [0, 7, 20]])
    assert torch.equal(matmul.embedding_rows(qt, ids), ref[ids])


@pytest.mark.parametrize("fmt", RAW)
@pytest.mark.parametrize("m", [1, 4, 13, 48, 49, 300])
def test_linear_matches_reference(path: str, fmt: str, m: int) -> None:
    """The dispatcher's paths on each side of its switches: fused up to FUSED_MAX_ROWS_AVX2
    (48) rows on AVX2, dequantized tiles above it; AVX-512 GEMM and panels from 20 / 128."""
    for n, k, bias in ((37, 256, False), (130, 512, True), (3, 768, False)):
        qt, ref_w = _blocks(fmt, n, k, n + k)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        b = torch.randn(n) if bias else None
        got = matmul.quantized_linear(x, qt, b)
        assert got.shape == (m, n) and got.dtype == torch.float32
        assert _rel_err(got, torch.nn.functional.linear(x, ref_w, b)) < 1e-4, (n, k)


def _native():
    ext = matmul.quant_linear_kernels()
    if ext is None:
        pytest.skip("the C++ quantized kernels could not be built here")
    return ext


@pytest.fixture(scope="module", params=["native", "avx2", "scalar"])
def ext_build(request):
    """The kernels as compiled for this CPU; on an AVX-512 CPU also an AVX2-only build (the
    path of CPUs without AVX-512); and a build without AVX2 (the portable scalar loops)."""
    ext = _native()
    if request.param == "avx2":
        if ext.simd() != "avx512":
            pytest.skip(f"the native build is already {ext.simd()}")
        ext = build_quant_linear_kernels("livelm_quant_linear_avx2", ("-mno-avx512f",))
        assert ext.simd() == "avx2"
    elif request.param == "scalar":
        ext = build_quant_linear_kernels("livelm_quant_linear_scalar", ("-mno-avx512f", "-mno-avx2", "-mno-fma"))
        assert ext.simd() == "scalar"
    return ext


@pytest.mark.parametrize("fmt", RAW)
def test_kernel_at_every_m(ext_build, fmt: str) -> None:
    """The C++ matmul itself at every row count (not only those the dispatcher sends it),
    ragged output rows, with and without bias, and its exact dequantization."""
    for n, k in ((45, 512), (13, 256)):
        qt, ref_w = _blocks(fmt, n, k, 7)
        code = FORMAT_CODES[fmt]
        assert torch.equal(ext_build.dequantize_rows(qt.qs, None, None, code, k, 0, n, None), ref_w)
        for bias in (torch.randn(n), None):
            for m in KERNEL_MS:
                x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
                got = ext_build.quantized_matmul(x, qt.qs, None, None, bias, code)
                assert _rel_err(got, torch.nn.functional.linear(x, ref_w, bias)) < 1e-4, (fmt, n, k, m)


def test_kernel_refuses_bad_rows() -> None:
    ext = _native()
    qt, _ = _blocks("q4_k", 4, 256, 8)
    with pytest.raises(RuntimeError, match="K divisible by 256"):
        ext.quantized_matmul(torch.randn(1, 128), qt.qs, None, None, None, FORMAT_CODES["q4_k"])
    with pytest.raises(RuntimeError, match="raw blocks"):
        ext.quantized_matmul(torch.randn(1, 512), qt.qs, None, None, None, FORMAT_CODES["q4_k"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt", RAW)
def test_cuda_matches_reference(fmt: str) -> None:
    qt, ref_w = _blocks(fmt, 70, 512, 6)
    cuda_qt = QuantizedTensor(qt.fmt, qt.shape, qt.qs.cuda())
    x = torch.randn(5, 512)
    assert _rel_err(matmul.quantized_linear(x.cuda(), cuda_qt).cpu(), x @ ref_w.T) < 1e-4
    ids = torch.tensor([1, 69, 5])
    assert torch.equal(matmul.embedding_rows(cuda_qt, ids.cuda()).cpu(), ref_w[ids])


def test_quantization_choices_agree() -> None:
    """EngineConfig (torch-free) lists the same quantization values as the planner."""
    from livelm.config import QUANTIZATION_CHOICES
    from livelm.quant.plan import QUANTIZATION_MODES

    assert QUANTIZATION_CHOICES == QUANTIZATION_MODES
