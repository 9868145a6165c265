"""The int8 VNNI path (`csrc/int8_vnni.cpp`) and its panel layout (`formats.int8_panels`):
the layout is an exact, invertible permutation; the kernel matches the float product of
the dequantized weight within the bound of its activation rounding at every batch size
and token-tile remainder; `Int8Linear` keeps its interface when it stores panels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from agentcpu.quant import Int8Linear, QuantizationError, formats, ops

needs_vnni = pytest.mark.skipif(
    not (ops.kernels() and ops.kernels().int8_vnni_available()),
    reason="no int8 VNNI kernel on this CPU",
)
# the loader lays layers out in panels only where the path is taken (not on AMX CPUs)
needs_vnni_path = pytest.mark.skipif(not ops.vnni_path(), reason="int8 VNNI path not taken here")


def _weight(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return formats.quantize_int8(torch.randn(n, k, generator=g) * 0.05, None)


def _x(rows, k, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    # columns of very different size, as real activations: a 64-block's scale follows its largest
    return (torch.randn(rows, k, generator=g) * torch.linspace(0.05, 4, k)).to(dtype)


def _bound(w: torch.Tensor, x: torch.Tensor, block: int) -> torch.Tensor:
    """|error| per output of rounding each activation to its block's int8 grid: at most
    half a step, amax / 254, times sum |w| over the block."""
    rows, k = x.shape
    amax = x.float().abs().reshape(rows, k // block, block).amax(-1)  # [M, blocks]
    wsum = w.abs().reshape(w.shape[0], k // block, block).sum(-1)  # [N, blocks]
    return amax @ wsum.T / 254


def test_panels_place_each_byte_where_the_kernel_reads_it():
    w = _weight(64, 96)
    p = formats.int8_panels(w)
    assert p.shape == (2, 24, 128) and p.dtype == torch.uint8
    for row in range(64):
        for step in range(24):  # line of k step `step` in panel row // 32: 4 bytes a row
            got = p[row // 32, step, 4 * (row % 32) : 4 * (row % 32) + 4]
            want = (w.qweight[row, 4 * step : 4 * step + 4].view(torch.uint8) ^ 0x80)
            assert torch.equal(got, want)
    assert torch.equal(formats.int8_rows_from_panels(p), w.qweight)


@pytest.mark.parametrize(
    ("n", "k", "groups"), [(48, 64, 1), (32, 80, 1), (32, 64, 2)], ids=["rows", "cols", "grouped"]
)
def test_panels_need_per_channel_scales_and_multiples_of_32(n, k, groups):
    w = formats.Int8Weight(torch.zeros(n, k, dtype=torch.int8), torch.ones(n, groups))
    with pytest.raises(QuantizationError, match="multiple of 32"):
        formats.int8_panels(w)


@needs_vnni
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 12, 13, 33, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k", [256, 96], ids=["blocks64", "blocks32"])
def test_kernel_within_activation_rounding_of_the_float_product(rows, dtype, k):
    w = _weight(96, k)
    bias = torch.randn(96).to(dtype)
    x = _x(rows, k, dtype)
    y = ops.kernels().int8_linear_vnni(x, formats.int8_panels(w), w.scales, bias)
    assert y.dtype == dtype and y.shape == (rows, 96)
    weight = formats.dequantize_int8(w)
    ref = F.linear(x.float(), weight, bias.float())
    out_rounding = ref.abs() * (2**-8 if dtype == torch.bfloat16 else 1e-6)
    bound = _bound(weight, x, 64 if k % 64 == 0 else 32) + out_rounding + 1e-5
    err = (y.float() - ref).abs()
    assert (err <= bound).all(), f"worst excess {(err - bound).max().item():.3g}"
    assert err.max() > 0  # the activations were rounded: the bound is not vacuous


@needs_vnni
def test_kernel_keeps_leading_dims_and_exact_zero_inputs():
    w = _weight(64, 128)
    bias = torch.randn(64)
    x = torch.zeros(2, 3, 128)
    x[1, 2] = _x(1, 128, torch.float32)[0]
    y = ops.kernels().int8_linear_vnni(x, formats.int8_panels(w), w.scales, bias)
    assert y.shape == (2, 3, 64)
    assert torch.equal(y[0, 0], bias)  # zero activations: scale 0, correction 0, only the bias
    weight = formats.dequantize_int8(w)
    ref = F.linear(x[1, 2], weight, bias)
    assert ((y[1, 2] - ref).abs() <= _bound(weight, x[1, 2:3], 64)[0] + 1e-5).all()


@needs_vnni
def test_kernel_refuses_a_weight_in_rows():
    w = _weight(32, 64)
    with pytest.raises(RuntimeError, match="panels"):
        ops.kernels().int8_linear_vnni(torch.ones(1, 64), w.qweight, w.scales, None)


@needs_vnni_path
def test_module_in_panels_keeps_its_interface():
    torch.manual_seed(0)
    layer = Int8Linear.from_float(torch.randn(64, 128) * 0.05, torch.randn(64).bfloat16())
    rows = layer.weight_data.qweight.clone()
    x = _x(16, 128, torch.bfloat16)
    before = layer(x).float()
    assert layer.lay_out_panels() and layer.in_panels and not layer.lay_out_panels()
    assert torch.equal(layer.weight_data.qweight, rows)
    after = layer(x).float()
    assert torch.allclose(after, before, rtol=0.03, atol=0.03)
    op = layer.decode_op(torch.bfloat16)
    assert op is not None and op.max_rows >= 1
    with pytest.raises(QuantizationError, match="before lay_out_panels"):
        layer.load_rows(0, formats.Int8Weight(rows[:32], layer.scales[:32]))


def test_grouped_or_odd_layers_stay_in_rows():
    grouped = Int8Linear(formats.quantize_int8(torch.randn(64, 128), 32))
    odd = Int8Linear.from_float(torch.randn(40, 128))
    assert not grouped.lay_out_panels() and not odd.lay_out_panels()
    assert not grouped.in_panels and not odd.in_panels
