"""The fused C++ decoder-layer ops against the torch ops they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from livelm.kernels.extensions import fused_ops_kernels
from livelm.layers import fused_ops
from livelm.models.rope import apply_rotary


@pytest.fixture
def kernels():
    k = fused_ops_kernels()
    if k is None:
        pytest.skip("no C++ compiler here: the torch path runs in every model test")
    return k


@pytest.mark.parametrize("rows", [1, 64, 300])
@pytest.mark.parametrize("inter", [37, 1536])
def test_silu_and_mul_matches_torch(kernels, rows: int, inter: int) -> None:
    g = torch.Generator().manual_seed(rows + inter)
    x = torch.randn(rows, 2 * inter, generator=g) * 6
    # Far tails: exp(-g) overflows (g << 0) or vanishes (g >> 0) inside the kernel.
    x[0, :8] = torch.tensor([-100.0, -88.5, -87.0, -1e-3, 0.0, 87.0, 88.5, 100.0])[: min(8, inter)]
    ref = F.silu(x[:, :inter]) * x[:, inter:]
    got = fused_ops.silu_and_mul(x)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-30)
    assert torch.isfinite(got).all()


def test_add_rms_norm_and_rotary_match_torch(kernels) -> None:
    g = torch.Generator().manual_seed(0)
    delta, residual, weight = torch.randn(7, 96, generator=g), torch.randn(7, 96, generator=g), torch.randn(96, generator=g)
    want_res = residual + delta
    want = weight * (want_res * torch.rsqrt(want_res.pow(2).mean(-1, keepdim=True) + 1e-6))
    normed, res = fused_ops.add_rms_norm(delta.clone(), residual.clone(), weight, 1e-6)
    torch.testing.assert_close(res, want_res, rtol=0, atol=0)
    torch.testing.assert_close(normed, want, rtol=1e-6, atol=1e-6)

    heads, kv, dim = 3, 1, 16
    qkv = torch.randn(5, (heads + 2 * kv) * dim, generator=g)
    angle = torch.rand(5, 1, dim // 2, generator=g) * 10
    cos, sin = angle.cos(), angle.sin()
    want_qk = apply_rotary(qkv[:, : (heads + kv) * dim].view(5, heads + kv, dim), cos, sin)
    got = qkv.clone()
    assert fused_ops.rotary_inplace(got, cos, sin, heads + kv, dim)
    torch.testing.assert_close(got[:, : (heads + kv) * dim].view(5, heads + kv, dim), want_qk, rtol=0, atol=0)
    torch.testing.assert_close(got[:, (heads + kv) * dim :], qkv[:, (heads + kv) * dim :], rtol=0, atol=0)
