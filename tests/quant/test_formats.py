"""Quantized formats: round-trip error bounds, nibble layout, GGUF Q8_0 / Q4_0 import."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.quants import GGMLQuantizationType, dequantize, quantize

from agentcpu.quant import formats
from agentcpu.quant.formats import QuantizationError


def _weight(n=48, k=256, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("group", [None, 32, 128])
def test_int8_error_is_at_most_half_a_step(group):
    w = _weight()
    q = formats.quantize_int8(w, group)
    step = q.scales.repeat_interleave(q.group_size, dim=1)
    assert q.qweight.dtype == torch.int8 and q.qweight.abs().max() <= 127
    assert ((formats.dequantize_int8(q) - w).abs() <= step / 2 + 1e-7).all()


@pytest.mark.parametrize("group", formats.INT4_GROUP_SIZES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_error_is_at_most_half_a_step(group, symmetric):
    w = _weight()
    q = formats.quantize_int4(w, group, symmetric)
    assert q.qweight.shape == (48, 128) and q.scales.dtype == torch.float16
    step = q.scales.float().abs().repeat_interleave(group, dim=1)
    # half a step, plus slack for the fp16 rounding of scale / offset; symmetric (Q4_0's
    # rule) puts the largest weight on level 0 = -8 steps, so the other sign reaches only
    # +7 steps and can be off by a whole step
    bound = 1.01 if symmetric else 0.51
    assert ((formats.dequantize_int4(q) - w).abs() <= step * bound + 1e-6).all()


@pytest.mark.parametrize(
    "quantize",
    [
        lambda w: formats.quantize_int8(w),
        lambda w: formats.quantize_int8(w, 32),
        lambda w: formats.quantize_int4(w, 32),
        lambda w: formats.quantize_int4(w, 64, symmetric=True),
    ],
)
def test_row_slabs_do_not_change_the_result(monkeypatch, quantize):
    """Quantizing in row slabs (small temporaries) gives what one whole-matrix pass
    gives, with a last slab shorter than the others and rows of zeros."""
    w = _weight(n=37, k=256, seed=3).bfloat16()
    w[4] = 0
    whole = quantize(w)  # 37 x 256 fp32 is one slab at the default size
    monkeypatch.setattr(formats, "SLAB_BYTES", 5 * 256 * 4)  # 5 rows a slab: 8 slabs
    sliced = quantize(w)
    for field in whole.__dataclass_fields__:
        assert torch.equal(getattr(whole, field), getattr(sliced, field)), field


def test_int4_symmetric_is_q4_0_grid():
    q = formats.quantize_int4(_weight(), 32, symmetric=True)
    assert torch.equal(q.offsets, (-8 * q.scales.float()).half())


def test_pack_int4_uses_q4_0_nibble_order():
    values = torch.arange(64, dtype=torch.uint8).remainder(16).reshape(1, 64)
    packed = formats.pack_int4(values)
    # byte j of each 32-block: low nibble = value j, high nibble = value j + 16
    assert packed[0, 0].item() == (0 | (0 << 4)) and packed[0, 1].item() == (1 | (1 << 4))
    shifted = torch.roll(values, 3, dims=1)
    assert packed[0, 0].item() == 0
    assert torch.equal(formats.unpack_int4(formats.pack_int4(shifted)), shifted)


@pytest.mark.parametrize(
    "call",
    [
        lambda w: formats.quantize_int4(w, 128),  # 96 is not a multiple of 128
        lambda w: formats.quantize_int4(w, 48),  # not an int4 group size
        lambda w: formats.quantize_int8(w, 64),
    ],
)
def test_group_must_divide_in_features(call):
    with pytest.raises(QuantizationError, match="group size"):
        call(_weight(k=96))


def _split_gguf_blocks(data: np.ndarray, block_bytes: int, rows: int):
    blocks = data.reshape(rows, -1, block_bytes)
    d = torch.from_numpy(blocks[..., :2].copy().view(np.float16)).reshape(rows, -1)
    qs = torch.from_numpy(blocks[..., 2:].copy())
    return d, qs


def test_q8_0_import_matches_gguf_dequantize():
    w = _weight(n=8, k=128).numpy()
    data = quantize(w, GGMLQuantizationType.Q8_0)
    d, qs = _split_gguf_blocks(data, 34, 8)
    q = formats.int8_from_q8_0(qs.view(torch.int8).reshape(8, 128), d)
    expected = torch.from_numpy(dequantize(data, GGMLQuantizationType.Q8_0))
    assert q.group_size == 32
    torch.testing.assert_close(formats.dequantize_int8(q), expected, rtol=0, atol=0)


def test_q4_0_import_matches_gguf_dequantize():
    w = _weight(n=8, k=128).numpy()
    data = quantize(w, GGMLQuantizationType.Q4_0)
    d, qs = _split_gguf_blocks(data, 18, 8)
    q = formats.int4_from_q4_0(qs.reshape(8, 64), d)
    expected = torch.from_numpy(dequantize(data, GGMLQuantizationType.Q4_0))
    torch.testing.assert_close(formats.dequantize_int4(q), expected, rtol=0, atol=1e-7)


def test_our_symmetric_int4_equals_q4_0_quantization():
    w = _weight(n=8, k=128)
    ours = formats.quantize_int4(w, 32, symmetric=True)
    d, qs = _split_gguf_blocks(quantize(w.numpy(), GGMLQuantizationType.Q4_0), 18, 8)
    assert torch.equal(ours.scales, d)
    assert (ours.qweight != qs.reshape(8, 64)).float().mean() < 0.01  # round-half ties only


def test_block_import_rejects_wrong_scale_shape():
    with pytest.raises(QuantizationError, match="block scales"):
        formats.int8_from_q8_0(torch.zeros(4, 64, dtype=torch.int8), torch.zeros(4, 3).half())
