"""Quantized formats and kernels: GGUF bit-exactness, and every kernel path against fp32
matmul of the exactly dequantized weights (compiled C++ and the pure-torch fallback)."""

from __future__ import annotations

import sys

import gguf
import numpy as np
import pytest
import torch

from livelm.kernels.extensions import build_quant_linear_kernels
from livelm.quant import matmul
from livelm.quant.formats import QUANTIZE_FORMATS, dequantize, quantize
from livelm.quant.gguf_repack import repack_gguf_tensor

GGUF_TYPES = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0,
              "q4_1": gguf.GGMLQuantizationType.Q4_1, "q5_0": gguf.GGMLQuantizationType.Q5_0,
              "q5_1": gguf.GGMLQuantizationType.Q5_1}  # fmt: skip


def _compiled():
    ext = matmul.quant_linear_kernels()
    if ext is None:
        pytest.skip("the C++ quantized kernels could not be built here")
    return ext


@pytest.fixture(params=["compiled", "fallback"])
def path(request, monkeypatch) -> str:
    """Run a test on the compiled kernels, then with them unavailable (the torch path)."""
    if request.param == "compiled":
        _compiled()
    else:
        monkeypatch.setattr(matmul, "quant_linear_kernels", lambda: None)
    return request.param


def _weight(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[0, :32] = 0.0  # an all-zero block (scale 0)
    return w


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("fmt", sorted(GGUF_TYPES))
def test_quantize_is_gguf_bit_exact(fmt: str) -> None:
    w = _weight(37, 96, 0)
    ref_blocks = gguf.quants.quantize(w.numpy(), GGUF_TYPES[fmt])
    ours = quantize(w, fmt)
    theirs = repack_gguf_tensor(ref_blocks, fmt.upper(), (37, 96))
    for key, t in ours.tensors().items():
        assert torch.equal(t, theirs.tensors()[key]), key
    ref = torch.from_numpy(gguf.quants.dequantize(ref_blocks, GGUF_TYPES[fmt]).reshape(37, 96))
    assert torch.equal(dequantize(ours), ref)


def test_int8_is_per_row() -> None:
    w = _weight(5, 70, 1)
    qt = quantize(w, "int8")
    assert qt.qs.dtype == torch.int8 and qt.scales().shape == (5,)
    assert (dequantize(qt) - w).abs().max() <= qt.scales().max() / 2 + 1e-7


@pytest.mark.parametrize("fmt", QUANTIZE_FORMATS)
@pytest.mark.parametrize("m", [1, 7, 64, 300])
def test_linear_matches_dequantized_matmul(path: str, fmt: str, m: int) -> None:
    for n, k, bias in ((37, 96, False), (130, 64, True), (3, 256, False)) + (
        ((11, 70, True),) if fmt == "int8" else ()  # int8 rows need not be whole blocks
    ):
        qt = quantize(_weight(n, k, n + k), fmt)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        b = torch.randn(n) if bias else None
        ref = torch.nn.functional.linear(x, dequantize(qt), b)
        got = matmul.quantized_linear(x, qt, b)
        assert got.shape == (m, n) and got.dtype == torch.float32
        assert _rel_err(got, ref) < 1e-4, (n, k)
        # A leading batch dimension and a non-contiguous input go through the same path.
        x3 = torch.randn(2, k, m).transpose(1, 2)
        ref3 = torch.nn.functional.linear(x3, dequantize(qt), b)
        assert _rel_err(matmul.quantized_linear(x3, qt, b), ref3) < 1e-4


@pytest.fixture(scope="module", params=["native", "avx2"])
def ext_build(request):
    """The kernels as compiled for this CPU and, on an AVX-512 CPU, an AVX2-only build (the
    code path of CPUs without AVX-512)."""
    ext = _compiled()
    if request.param == "avx2":
        if ext.simd() != "avx512":
            pytest.skip(f"the native build is already {ext.simd()}")
        ext = build_quant_linear_kernels("livelm_quant_linear_avx2", ("-mno-avx512f",))
        assert ext.simd() == "avx2"
    return ext


# Row counts around every tile size and path switch of the C++ kernels (4x4 and 8x2 tiles,
# the GEMM from 20 rows in 32-row panels with a last one of <= 16, 512 KiB passes of x,
# dequantized column panels from 128 rows in row blocks of up to 6).
KERNEL_MS = [1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 19, 20, 21, 31, 33, 48, 64, 127, 128, 131, 300]


@pytest.mark.parametrize("fmt", QUANTIZE_FORMATS)
def test_fused_kernel_at_every_m(ext_build, fmt: str) -> None:
    """The C++ kernel itself at every row count (not only those the dispatcher sends it),
    with ragged output rows (not a multiple of any tile) and, for int8, ragged K."""
    shapes = [(45, 160), (13, 576)] + ([(11, 70), (6, 17), (29, 200)] if fmt == "int8" else [(7, 32)])
    for n, k in shapes:
        qt = quantize(_weight(n, k, 7), fmt)
        w = dequantize(qt)
        for bias in (torch.randn(n), None):
            for m in KERNEL_MS:
                x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
                got = ext_build.quantized_matmul(x, qt.qs, qt.d, qt.m, bias, matmul.FORMAT_CODES[fmt])
                assert _rel_err(got, torch.nn.functional.linear(x, w, bias)) < 1e-4, (n, k, m)


@pytest.mark.parametrize(("m", "k"), [(100, 1536), (1100, 64)])
def test_gemm_paths_pass_over_x_in_chunks(m: int, k: int) -> None:
    """Enough rows of x that the GEMM (below 128 rows) takes several 512 KiB passes (K=1536:
    64 rows each), and that the panel path (from 128) takes several 1024-row passes."""
    ext = _compiled()
    qt = quantize(_weight(70, k, 8), "q4_1")
    x = torch.randn(m, k)
    got = ext.quantized_matmul(x, qt.qs, qt.d, qt.m, None, matmul.FORMAT_CODES["q4_1"])
    assert _rel_err(got, x @ dequantize(qt).T) < 1e-4


def test_avx512_builds_take_every_row_count() -> None:
    ext = _compiled()
    limit = matmul.fused_max_rows(ext)
    assert limit == (sys.maxsize if ext.simd() == "avx512" else matmul.FUSED_MAX_ROWS_AVX2)


@pytest.mark.parametrize("fmt", QUANTIZE_FORMATS)
def test_dequantized_rows_are_exact(path: str, fmt: str) -> None:
    qt = quantize(_weight(50, 64, 3), fmt)
    full = dequantize(qt)
    assert torch.equal(matmul.dequantize_rows(qt, 10, 17), full[10:27])
    ids = torch.tensor([[3, 49, 3], [0, 7, 20]])
    assert torch.equal(matmul.embedding_rows(qt, ids), full[ids])


def test_tiled_prefill_path_covers_many_tiles(path: str) -> None:
    qt = quantize(_weight(3000, 128, 4), "q4_1")  # more rows than one dequantized tile
    x = torch.randn(40, 128)
    got = matmul.quantized_linear(x, qt)
    assert _rel_err(got, x @ dequantize(qt).T) < 1e-4


def test_bf16_activations_keep_their_dtype() -> None:
    qt = quantize(_weight(64, 64, 5), "q8_0")
    x = torch.randn(3, 64)
    got = matmul.quantized_linear(x.bfloat16(), qt)
    assert got.dtype == torch.bfloat16
    assert _rel_err(got.float(), x.bfloat16().float() @ dequantize(qt).T) < 1e-2


def test_bad_formats_and_shapes_are_named() -> None:
    with pytest.raises(ValueError, match=r"q3_k.*supported: q8_0, q4_0, q4_1, int8, q5_0, q5_1, q4_k, q5_k, q6_k$"):
        quantize(torch.zeros(4, 64), "q3_k")
    with pytest.raises(ValueError, match=r"no quantizer for q6_k.*quantizable: q8_0, q4_0, q4_1, int8, q5_0, q5_1$"):
        quantize(torch.zeros(4, 256), "q6_k")
    with pytest.raises(ValueError, match=r"32-weight blocks.*48 columns"):
        quantize(torch.zeros(4, 48), "q4_0")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt", QUANTIZE_FORMATS)
def test_cuda_matches_cpu(fmt: str) -> None:
    qt = quantize(_weight(70, 128, 6), fmt)
    cuda_qt = type(qt)(qt.fmt, qt.shape, *(None if t is None else t.cuda() for t in (qt.qs, qt.d, qt.m)))
    x = torch.randn(5, 128)
    ref = x @ dequantize(qt).T
    got = matmul.quantized_linear(x.cuda(), cuda_qt).cpu()
    assert _rel_err(got, ref) < 1e-4
    ids = torch.tensor([1, 69, 5])
    assert torch.equal(matmul.embedding_rows(cuda_qt, ids.cuda()).cpu(), dequantize(qt)[ids])


def test_float_gguf_tensors_stay_float() -> None:
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = repack_gguf_tensor(w, "F32", (3, 4))
    assert torch.equal(out, torch.from_numpy(w))
