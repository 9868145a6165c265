"""The compiled bf16-weight small-batch linear matches an fp32 reference, and
`dense_linear` routes batched bf16 decode to it where the CPU lacks native bf16 GEMM."""

import pytest
import torch
import torch.nn.functional as F

from agentcpu.layers import linear
from agentcpu.layers.bf16_kernel import bf16_kernel

needs_kernel = pytest.mark.skipif(bf16_kernel() is None, reason="no compiled kernel on this CPU")


def _reference(x, w, b):
    return F.linear(x.float(), w.float(), None if b is None else b.float())


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 13, 32])
@pytest.mark.parametrize("n, k", [(1, 8), (2, 16), (47, 64), (100, 203), (96, 1024), (130, 2061)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_fp32_reference(rows, n, k, dtype):
    """(130, 2061): several 48-row tasks, the last one short, and a scalar tail past
    the last multiple of 8 in long rows."""
    gen = torch.Generator().manual_seed(rows * 1000 + n * 10 + k)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    w = torch.randn(n, k, generator=gen).bfloat16()
    b = torch.randn(n, generator=gen).bfloat16()
    out = bf16_kernel().bf16_linear_small_batch(x, w, b)
    assert out.dtype == dtype and out.shape == (rows, n)
    ref = _reference(x, w, b)
    # fp32 accumulation in a different order; bf16 outputs are rounded once
    tol = 1e-4 if dtype == torch.float32 else 8e-3
    assert torch.allclose(out.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@needs_kernel
def test_keeps_leading_dimensions_and_no_bias():
    x = torch.randn(2, 3, 64)
    w = torch.randn(10, 64).bfloat16()
    out = bf16_kernel().bf16_linear_small_batch(x, w, None)
    assert out.shape == (2, 3, 10)
    assert torch.allclose(out, _reference(x, w, None), rtol=1e-4, atol=1e-3)


@needs_kernel
def test_rejects_mismatched_features():
    with pytest.raises(RuntimeError, match="features"):
        bf16_kernel().bf16_linear_small_batch(torch.randn(2, 32), torch.randn(4, 16).bfloat16(), None)


@needs_kernel
def test_dense_linear_routes_small_batches_to_the_kernel(monkeypatch):
    monkeypatch.setattr(linear, "native_bf16_matmul", lambda: False)
    calls = []
    real = bf16_kernel()

    class Spy:
        def bf16_linear_small_batch(self, *args):
            calls.append(args[0].shape[0])
            return real.bf16_linear_small_batch(*args)

    monkeypatch.setattr(linear, "bf16_kernel", lambda: Spy())
    w, b = torch.randn(24, 64).bfloat16(), torch.randn(24).bfloat16()
    for rows in (1, 8, linear.SMALL_BATCH_MAX_ROWS, linear.SMALL_BATCH_MAX_ROWS + 1):
        x = torch.randn(rows, 64).bfloat16()
        out = linear.dense_linear(x, w, b)
        assert torch.allclose(out.float(), _reference(x, w, b), rtol=8e-3, atol=0.1)
    assert calls == [1, 8, linear.SMALL_BATCH_MAX_ROWS]  # above the cap: widen to fp32
