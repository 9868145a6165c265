"""The AMX tile bf16 linear matches an fp32 reference, and `dense_linear` routes bf16
products of up to `AMX_MAX_ROWS` rows to it on CPUs with AMX (Sapphire Rapids+) when
enabled."""

import pytest
import torch
import torch.nn.functional as F

from agentcpu.layers import linear
from agentcpu.layers.amx_kernel import ENABLE_ENV, amx_shape_ok, built_amx_kernel

needs_amx = pytest.mark.skipif(
    built_amx_kernel() is None, reason="CPU or OS without AMX bf16 tiles"
)


def _reference(x, w, b):
    return F.linear(x.float(), w.float(), None if b is None else b.float())


@needs_amx
@pytest.mark.parametrize("rows", [1, 2, 15, 16, 17, 31, 32, 33, 64, 100, 130])
@pytest.mark.parametrize("n, k", [(16, 32), (48, 64), (80, 96), (1152, 896), (96, 4864)])
def test_matches_fp32_reference(rows, n, k):
    """Every remainder of the 16-token tile and the 2-tile token pass, an odd number of
    16-row weight blocks (48, 80: the last task has one block), long K."""
    gen = torch.Generator().manual_seed(rows * 1000 + n * 10 + k)
    x = torch.randn(rows, k, generator=gen).bfloat16()
    w = (torch.randn(n, k, generator=gen) * 0.05).bfloat16()
    b = torch.randn(n, generator=gen).bfloat16()
    out = built_amx_kernel().amx_bf16_linear(x, w, b)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, n)
    ref = _reference(x, w, b)
    # exact bf16 products, fp32 sums in another order, one bf16 rounding at the end
    assert torch.allclose(out.float(), ref, rtol=8e-3, atol=8e-3 * ref.abs().max().item())


@needs_amx
def test_keeps_leading_dimensions_and_no_bias():
    x = torch.randn(2, 3, 64).bfloat16()
    w = torch.randn(32, 64).bfloat16()
    out = built_amx_kernel().amx_bf16_linear(x, w, None)
    assert out.shape == (2, 3, 32)
    ref = _reference(x, w, None)
    assert torch.allclose(out.float(), ref, rtol=8e-3, atol=8e-3 * ref.abs().max().item())


@needs_amx
def test_rejects_shapes_that_do_not_tile():
    with pytest.raises(RuntimeError, match="N % 16"):
        built_amx_kernel().amx_bf16_linear(
            torch.randn(2, 64).bfloat16(), torch.randn(20, 64).bfloat16(), None
        )
    with pytest.raises(RuntimeError, match="features"):
        built_amx_kernel().amx_bf16_linear(
            torch.randn(2, 32).bfloat16(), torch.randn(16, 64).bfloat16(), None
        )


def test_shape_rule():
    assert amx_shape_ok((1152, 896)) and amx_shape_ok((151936, 896))
    assert not amx_shape_ok((20, 64)) and not amx_shape_ok((16, 48))


@needs_amx
def test_dense_linear_routes_to_the_tile_kernel(monkeypatch):
    calls = []
    real = built_amx_kernel()

    class Spy:
        def amx_bf16_linear(self, *args):
            calls.append(args[0].shape[0])
            return real.amx_bf16_linear(*args)

    monkeypatch.setattr(linear, "amx_kernel", lambda: Spy())
    w, b = torch.randn(32, 64).bfloat16(), torch.randn(32).bfloat16()
    for rows in (1, 8, linear.AMX_MAX_ROWS, linear.AMX_MAX_ROWS + 1):
        x = torch.randn(rows, 64).bfloat16()
        out = linear.dense_linear(x, w, b)
        ref = _reference(x, w, b)
        assert torch.allclose(out.float(), ref, rtol=8e-3, atol=8e-3 * ref.abs().max().item())
    assert calls == [1, 8, linear.AMX_MAX_ROWS]  # above the cap: PyTorch's oneDNN GEMM
    odd = torch.randn(20, 64).bfloat16()  # does not tile: PyTorch's path
    linear.dense_linear(torch.randn(4, 64).bfloat16(), odd, None)
    assert calls == [1, 8, linear.AMX_MAX_ROWS]


def test_off_unless_enabled(monkeypatch):
    from agentcpu.layers import amx_kernel as module

    monkeypatch.delenv(ENABLE_ENV, raising=False)
    assert module.amx_kernel() is None
    monkeypatch.setenv(ENABLE_ENV, "1")
    assert module.amx_kernel() is module.built_amx_kernel()
