"""The AVX-512 BF16 (VDPBF16PS) linear matches an fp32 reference, and `dense_linear`
routes decode-sized bf16 products to it on CPUs with AVX-512 BF16."""

import pytest
import torch
import torch.nn.functional as F

from agentcpu.layers import linear
from agentcpu.layers.bf16_kernel import bf16_dot_kernel

needs_dot = pytest.mark.skipif(bf16_dot_kernel() is None, reason="CPU without AVX-512 BF16")


def _reference(x, w, b):
    return F.linear(x.float(), w.float(), None if b is None else b.float())


def _assert_close(out, ref):
    # exact bf16 products, fp32 sums in another order, one bf16 rounding at the end
    assert torch.allclose(out.float(), ref, rtol=8e-3, atol=8e-3 * ref.abs().max().item())


@needs_dot
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 8, 13, 32, 129])
@pytest.mark.parametrize("n, k", [(1, 8), (3, 32), (47, 64), (100, 203), (130, 2061), (264, 896)])
def test_matches_fp32_reference(rows, n, k):
    """Every remainder of the 4-row micro-tile and of the token groups (6 at most,
    split evenly), K shorter than one 32-wide step and with a masked tail, several
    64-row tasks with a short last one, and a prefetch that runs past the last tile."""
    gen = torch.Generator().manual_seed(rows * 1000 + n * 10 + k)
    x = torch.randn(rows, k, generator=gen).bfloat16()
    w = (torch.randn(n, k, generator=gen) * 0.1).bfloat16()
    b = torch.randn(n, generator=gen).bfloat16()
    out = bf16_dot_kernel().bf16_dot_linear(x, w, b)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, n)
    _assert_close(out, _reference(x, w, b))


@needs_dot
def test_keeps_leading_dimensions_and_no_bias():
    x = torch.randn(2, 3, 64).bfloat16()
    w = torch.randn(10, 64).bfloat16()
    out = bf16_dot_kernel().bf16_dot_linear(x, w, None)
    assert out.shape == (2, 3, 10)
    _assert_close(out, _reference(x, w, None))


@needs_dot
def test_rejects_what_it_cannot_multiply():
    dot = bf16_dot_kernel()
    with pytest.raises(RuntimeError, match="features"):
        dot.bf16_dot_linear(torch.randn(2, 32).bfloat16(), torch.randn(4, 16).bfloat16(), None)
    with pytest.raises(RuntimeError, match="input must be bf16"):
        dot.bf16_dot_linear(torch.randn(2, 16), torch.randn(4, 16).bfloat16(), None)
    with pytest.raises(RuntimeError, match="bias"):
        dot.bf16_dot_linear(
            torch.randn(2, 16).bfloat16(), torch.randn(4, 16).bfloat16(), torch.randn(3)
        )


@needs_dot
def test_dense_linear_routes_decode_sized_products_to_it(monkeypatch):
    monkeypatch.setattr(linear, "native_bf16_matmul", lambda: True)
    monkeypatch.setattr(linear, "amx_kernel", lambda: None)
    calls = []
    real = bf16_dot_kernel()

    class Spy:
        def bf16_dot_linear(self, *args):
            calls.append(args[0].shape[0])
            return real.bf16_dot_linear(*args)

    monkeypatch.setattr(linear, "bf16_dot_kernel", lambda: Spy())
    w, b = torch.randn(24, 64).bfloat16(), torch.randn(24).bfloat16()
    cap = linear.dot_max_rows()
    for rows in (1, cap, cap + 1):
        x = torch.randn(rows, 64).bfloat16()
        _assert_close(linear.dense_linear(x, w, b), _reference(x, w, b))
    linear.dense_linear(torch.randn(2, 64), w.float(), None)  # fp32 weights: PyTorch
    assert calls == [1, cap]  # above the cap: oneDNN's GEMM
