"""fp32 linears over packed weights: livelm's panel GEMM against fp64 matmul, and which
packed linear a model gets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from livelm.layers import packed_linear as pl


def _panel():
    ext = pl.panel_kernels()
    if ext is None:
        pytest.skip("the panel GEMM needs an AVX-512 build of the C++ kernels")
    return ext


# Row counts cover the decode tiles (1..6 rows, streamed with prefetch), uneven row blocks
# (7, 13), the batched sweep (64, 300) and two 1024-row passes (1030); column counts cover
# partial panels and partial groups of four panels; K covers 1 and non-multiples of 16.
@pytest.mark.parametrize("m", [1, 2, 6, 7, 13, 64, 300, 1030])
@pytest.mark.parametrize(("n", "k"), [(1, 1), (15, 33), (17, 96), (100, 576), (129, 70)])
def test_panel_linear_matches_fp64(m: int, n: int, k: int) -> None:
    ext = _panel()
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x, w, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    packed = ext.fp32_pack(w)
    assert packed.shape == ((n + 15) // 16, k, 16)
    ref = x.double() @ w.double().T
    for bias, want in ((None, ref), (b, ref + b.double())):
        got = ext.fp32_linear(x, packed, bias, n)
        assert got.shape == (m, n)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_panel_linear_module_takes_any_leading_shape_and_strided_rows() -> None:
    ext = _panel()
    lin = nn.Linear(40, 23)
    mod = pl.PanelLinear(lin.weight, lin.bias, ext)
    x = torch.randn(3, 5, 80)[..., ::2]  # not contiguous
    with torch.no_grad():
        torch.testing.assert_close(mod(x), lin(x), rtol=1e-5, atol=1e-5)
    assert mod(x).shape == (3, 5, 23)


def test_bad_shapes_are_refused() -> None:
    ext = _panel()
    packed = ext.fp32_pack(torch.randn(20, 32))
    with pytest.raises(RuntimeError, match="columns"):
        ext.fp32_linear(torch.randn(2, 31), packed, None, 20)
    with pytest.raises(RuntimeError, match="fp32_pack"):
        ext.fp32_linear(torch.randn(2, 32), packed, None, 40)
    with pytest.raises(RuntimeError, match="N elements"):
        ext.fp32_linear(torch.randn(2, 32), packed, torch.randn(19), 20)


def test_models_get_the_panel_gemm_unless_disabled(monkeypatch) -> None:
    _panel()
    model = nn.Sequential(nn.Linear(32, 48), nn.Linear(48, 16, bias=False))
    x = torch.randn(4, 32)
    with torch.no_grad():
        ref = model(x)
        assert pl.pack_linear_layers(model) == 2
        assert all(type(m) is pl.PanelLinear for m in model)
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("LIVELM_DISABLE_PANEL_GEMM", "1")
    other = pl.packed_linear(torch.randn(8, 16), None)
    assert not isinstance(other, pl.PanelLinear)
    assert pl.packed_linear(torch.randn(8, 16, dtype=torch.bfloat16), None) is None
