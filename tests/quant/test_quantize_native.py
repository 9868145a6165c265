"""The compiled quantizers (`quant/csrc/quantize.cpp`) give the same bytes as the PyTorch
reference in `formats.py`, which runs where no kernels build: every dtype the loader
hands them, each int4 group size in both forms, int8 per channel and per group (a group
that is not a multiple of 32 takes the scalar loop), all-zero groups, exact ties for
the largest magnitude and for rounding, and the fp16 range errors."""

from __future__ import annotations

import pytest
import torch

from agentcpu.quant import formats
from agentcpu.quant.kernels import kernels

pytestmark = pytest.mark.skipif(kernels() is None, reason="no compiled kernels here")


@pytest.fixture
def reference(monkeypatch):
    """Runs a quantizer with the compiled path turned off."""

    def run(fn, *args):
        with monkeypatch.context() as m:
            m.setattr(formats, "_native_quantizer", lambda weight: None)
            return fn(*args)

    return run


def _weights(dtype, seed, rows=40, cols=256):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) * 3
    w[:3, :64] = 0  # all-zero groups: scale 0, every level 0 (int8) or 8 (int4 sym)
    w[3:6] = torch.round(w[3:6] * 4) / 4  # many values on the rounding grid: ties to even
    w[6, 5], w[6, 40] = -2.5, 2.5  # the same magnitude twice in one group: argmax's first
    w[7, 7], w[7, 9] = 2.0, -2.0
    return w.to(dtype)


def _assert_same(a, b):
    for field in ("qweight", "scales", "offsets"):
        if hasattr(a, field):
            x, y = getattr(a, field), getattr(b, field)
            assert x.dtype == y.dtype and x.shape == y.shape
            assert torch.equal(
                x.view(torch.uint8) if x.dtype == torch.float16 else x,
                y.view(torch.uint8) if y.dtype == torch.float16 else y,
            ), field


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_matches_the_reference(reference, dtype, group, symmetric):
    for seed in range(3):
        w = _weights(dtype, seed)
        _assert_same(
            formats.quantize_int4(w, group, symmetric),
            reference(formats.quantize_int4, w, group, symmetric),
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [None, 32, 128, 48])
def test_int8_matches_the_reference(reference, dtype, group):
    cols = 240 if group == 48 else 256  # 48: the scalar loop, 240 = 5 groups
    for seed in range(3):
        w = _weights(dtype, seed, cols=cols)
        _assert_same(formats.quantize_int8(w, group), reference(formats.quantize_int8, w, group))


def test_a_large_weight_splits_over_threads_the_same_way(reference):
    w = _weights(torch.bfloat16, 7, rows=1000, cols=896)  # several parallel row ranges
    _assert_same(formats.quantize_int4(w, 32, True), reference(formats.quantize_int4, w, 32, True))
    _assert_same(formats.quantize_int8(w), reference(formats.quantize_int8, w))


@pytest.mark.parametrize("what, value", [("scales", 2e6), ("offsets", -7e4)])
def test_out_of_fp16_range_raises_like_the_reference(reference, what, value):
    w = torch.zeros(8, 64)
    w[2, 3] = value  # asymmetric: range 2e6 -> scale ~1.3e5; min -7e4 -> offset too big
    if what == "offsets":
        w[2, 4] = -6.9e4  # keeps (max - min) / 15 small
    with pytest.raises(formats.QuantizationError, match=what):
        formats.quantize_int4(w, 32)
    with pytest.raises(formats.QuantizationError, match=what):
        reference(formats.quantize_int4, w, 32)


def test_a_strided_weight_is_read_in_order(reference):
    w = _weights(torch.bfloat16, 3, cols=512)[:, ::2]  # a column-strided view
    _assert_same(formats.quantize_int4(w, 32), reference(formats.quantize_int4, w.contiguous(), 32))
