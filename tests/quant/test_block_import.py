"""GGUF blocks in our formats without a float step (Q4_0 as int8, Q4_1 as int4), and
quantized modules filled part by part (`empty` + `load_rows`), as the GGUF loader does."""

from __future__ import annotations

import pytest
import torch
from gguf.quants import GGMLQuantizationType, dequantize, quantize

from agentcpu.loaders.gguf_tensors import q4_0_blocks, q4_1_blocks, q8_0_blocks
from agentcpu.quant import Int4Linear, Int8Linear, QuantizationError, formats

Q = GGMLQuantizationType


def _raw(qtype, rows=8, cols=128, seed=0):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05
    return quantize(w.numpy(), qtype)


def _gguf(raw, qtype) -> torch.Tensor:
    return torch.from_numpy(dequantize(raw, qtype))


def test_q4_0_as_int8_is_exact():
    raw = _raw(Q.Q4_0)
    weight = formats.int8_from_q4_0(*q4_0_blocks(raw))
    assert weight.group_size == 32 and weight.qweight.min() >= -8 and weight.qweight.max() <= 7
    assert torch.equal(formats.dequantize_int8(weight), _gguf(raw, Q.Q4_0))


def test_q4_1_as_int4_is_exact():
    raw = _raw(Q.Q4_1)
    weight = formats.int4_from_q4_1(*q4_1_blocks(raw))
    assert weight.group_size == 32
    assert torch.equal(formats.dequantize_int4(weight), _gguf(raw, Q.Q4_1))


@pytest.mark.parametrize(
    "module,qtype,convert",
    [
        (Int8Linear, Q.Q8_0, lambda raw: formats.int8_from_q8_0(*q8_0_blocks(raw))),
        (Int8Linear, Q.Q4_0, lambda raw: formats.int8_from_q4_0(*q4_0_blocks(raw))),
        (Int4Linear, Q.Q4_0, lambda raw: formats.int4_from_q4_0(*q4_0_blocks(raw))),
    ],
)
def test_an_empty_module_filled_part_by_part_holds_the_parts_in_row_order(module, qtype, convert):
    parts = [_raw(qtype, rows, 64, seed) for seed, rows in enumerate((8, 4, 4))]
    layer = module.empty(16, 64, 32, torch.bfloat16)
    start = 0
    for raw in parts:
        layer.load_rows(start, convert(raw))
        layer.load_bias_rows(start, torch.full((raw.shape[0],), float(start)))
        start += raw.shape[0]
    expected = torch.cat([_gguf(raw, qtype) for raw in parts])
    assert torch.equal(layer.dequantized_weight(), expected)
    assert (
        layer.bias.dtype == torch.bfloat16 and layer.bias.tolist() == [0] * 8 + [8] * 4 + [12] * 4
    )


def test_load_rows_refuses_what_does_not_fit():
    layer = Int8Linear.empty(16, 64, 32, None)
    part = formats.int8_from_q8_0(*q8_0_blocks(_raw(Q.Q8_0, 8, 64)))
    with pytest.raises(QuantizationError, match="does not fit rows 12"):
        layer.load_rows(12, part)
    per_channel = formats.quantize_int8(torch.randn(8, 64))
    with pytest.raises(QuantizationError, match="scales"):
        layer.load_rows(0, per_channel)
    with pytest.raises(QuantizationError, match="no bias"):
        layer.load_bias_rows(0, torch.zeros(8))


def test_empty_on_meta_allocates_nothing():
    with torch.device("meta"):
        layer = Int4Linear.empty(4096, 4096, 32, torch.bfloat16)
    assert all(t.is_meta for t in layer.buffers())
    assert layer.weight_data.group_size == 32
