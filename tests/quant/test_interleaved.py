"""The 8-row interleaved int4 layout (`formats.interleave_int4`): the permutation is
exact and invertible, every kernel path reads it (GEMV, tiled, packed) with the results
of the row layout, and `Int4Linear` keeps its interface when it stores it."""

from __future__ import annotations

import pytest
import torch

from agentcpu.quant import Int4Linear, QuantizationError, formats, ops
from agentcpu.quant.kernels import kernels

needs_kernels = pytest.mark.skipif(kernels() is None, reason="no compiled kernels here")


def _weight(n=24, k=256, group=32, symmetric=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return formats.quantize_int4(torch.randn(n, k, generator=g) * 0.05, group, symmetric)


def _x(batch, k=256, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, k, generator=g) * torch.linspace(0.1, 3, k)).to(dtype)


def test_interleave_places_each_byte_and_scale_where_the_kernel_reads_it():
    w = _weight(n=16, k=128, group=64)
    q, s, m = formats.interleave_int4(w)
    assert q.shape == (2, 4, 128) and s.shape == m.shape == (2, 2, 8)
    for row in range(16):
        for block in range(4):
            for p in range(4):  # vector p of a block: bytes 4p..4p+3 of every row in turn
                got = q[row // 8, block, 32 * p + 4 * (row % 8) : 32 * p + 4 * (row % 8) + 4]
                assert torch.equal(got, w.qweight[row, 16 * block + 4 * p : 16 * block + 4 * p + 4])
        assert torch.equal(s[row // 8, :, row % 8], w.scales[row])
        assert torch.equal(m[row // 8, :, row % 8], w.offsets[row])
    back = formats.deinterleave_int4(q, s, m)
    for name in ("qweight", "scales", "offsets"):
        assert torch.equal(getattr(back, name), getattr(w, name))


def test_symmetric_weights_store_no_offsets():
    """Q4_0's w = scale * (q - 8): the offsets are -8 x the scales, so the interleaved
    layout keeps none ([N/8, groups, 0]) and the row layout comes back exact."""
    w = _weight(n=16, k=128, group=32, symmetric=True)
    assert formats.is_symmetric_int4(w)
    q, s, m = formats.interleave_int4(w)
    assert m.shape == (2, 4, 0) and m.dtype == torch.float16
    back = formats.deinterleave_int4(q, s, m)
    for name in ("qweight", "scales", "offsets"):
        assert torch.equal(getattr(back, name), getattr(w, name))
    g = torch.Generator().manual_seed(5)
    q0 = formats.int4_from_q4_0(
        torch.randint(0, 256, (8, 64), dtype=torch.uint8, generator=g), torch.rand(8, 4).half()
    )
    assert formats.interleave_int4(q0)[2].numel() == 0  # GGUF Q4_0 reads 4.5 bits a weight too
    nearly = formats.Int4Weight(w.qweight, w.scales, w.offsets.clone())
    nearly.offsets[3, 1] += 1e-3  # one offset off: asymmetric, all kept
    assert formats.interleave_int4(nearly)[2].shape == (2, 4, 8)


def test_interleave_refuses_rows_not_a_multiple_of_8():
    with pytest.raises(QuantizationError, match="multiple of 8"):
        formats.interleave_int4(_weight(n=12))


@needs_kernels
@pytest.mark.parametrize("batch", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("group", formats.INT4_GROUP_SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [False, True])
def test_interleaved_gemv_equals_the_row_gemv(batch, group, dtype, symmetric):
    """Same quantized activations, same products: only the fp32 summation order differs
    (the row kernel sums a row's lanes at the end, this one per block)."""
    w = _weight(n=40, k=640, group=group, symmetric=symmetric)
    x, bias = _x(batch, k=640, dtype=dtype), torch.randn(40).to(dtype)
    rows = kernels().int4_linear_gemv(x, w.qweight, w.scales, w.offsets, bias)
    out = kernels().int4_linear_gemv(x, *formats.interleave_int4(w), bias)
    assert out.dtype == dtype and out.shape == rows.shape
    scale = rows.float().abs().max().item()
    tol = 1e-5 if dtype == torch.float32 else 2.0**-7
    assert (out.float() - rows.float()).abs().max().item() <= tol * scale


@needs_kernels
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_interleaved_tiled_equals_the_row_tiled(bf16, symmetric):
    w = _weight(n=296, k=288, group=32, symmetric=symmetric)  # 296 rows: a partial last tile
    x = _x(17, k=288)
    rows = kernels().int4_linear_tiled(x, w.qweight, w.scales, w.offsets, None, bf16)
    assert torch.equal(
        kernels().int4_linear_tiled(x, *formats.interleave_int4(w), None, bf16), rows
    )


@needs_kernels
@pytest.mark.skipif(not (kernels() and kernels().quant_packed_available()), reason="no packed path")
@pytest.mark.parametrize("symmetric", [False, True])
def test_interleaved_packed_equals_the_row_packed(symmetric):
    w = _weight(n=80, k=256, group=64, symmetric=symmetric)
    x, bias = _x(40, dtype=torch.bfloat16), torch.randn(80).bfloat16()
    rows = kernels().int4_linear_packed(x, w.qweight, w.scales, w.offsets, bias)
    assert torch.equal(kernels().int4_linear_packed(x, *formats.interleave_int4(w), bias), rows)


@pytest.mark.parametrize("symmetric", [False, True])
def test_reference_path_reads_the_interleaved_layout(symmetric):
    w = _weight(symmetric=symmetric)
    x = _x(3)
    rows = ops.int4_linear_reference(x, w.qweight, w.scales, w.offsets, None)
    assert torch.equal(ops.int4_linear_reference(x, *formats.interleave_int4(w), None), rows)
    assert ops.int4_shape(formats.interleave_int4(w)[0]) == ops.int4_shape(w.qweight) == (24, 256)


@needs_kernels
def test_int4_linear_interleaves_in_place_and_keeps_its_interface():
    w = _weight(n=48, k=128, group=32)
    layer = Int4Linear(w, torch.randn(48))
    x = _x(2, k=128)
    before, weight_before = layer(x), layer.dequantized_weight()
    assert layer.interleave_rows() and layer.interleaved
    assert not layer.interleave_rows()  # once only
    assert layer.qweight.shape == (6, 4, 128)
    assert torch.equal(layer.dequantized_weight(), weight_before)
    assert (layer(x) - before).abs().max() <= 1e-5 * before.abs().max()
    with pytest.raises(QuantizationError, match="before interleave_rows"):
        layer.load_rows(0, formats.Int4Weight(w.qweight[:8], w.scales[:8], w.offsets[:8]))


@needs_kernels
def test_int4_linear_keeps_rows_where_the_shape_does_not_interleave():
    assert not Int4Linear(_weight(n=12)).interleave_rows()  # 12 outputs: not groups of 8
    assert not Int4Linear(_weight(n=16, k=96)).interleave_rows()  # 96 inputs: not whole 64-chunks
