"""Unit checks of the GGUF tensor path: names, q/k row order, block layouts, rope."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from agentcpu.errors import ModelLoadError, UnsupportedModelError
from agentcpu.layers.rope import rope_inv_freq
from agentcpu.loaders import gguf_tensors
from agentcpu.loaders.gguf_file import llama3_scaling_from_factors
from agentcpu.loaders.gguf_tensors import (
    GGUFTensor,
    dequantize,
    hf_tensor_name,
    q4_0_blocks,
    q8_0_blocks,
    unpermute_rows,
)

Q = GGMLQuantizationType


def converter_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, as written there."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


@pytest.mark.parametrize("heads,head_dim,cols", [(4, 16, 8), (2, 64, 3), (8, 2, 1)])
def test_unpermute_inverts_the_converter(heads, head_dim, cols):
    weights = np.random.default_rng(0).standard_normal((heads * head_dim, cols))
    assert np.array_equal(unpermute_rows(converter_permute(weights, heads), heads), weights)
    bias = weights[:, 0].copy()
    assert np.array_equal(unpermute_rows(converter_permute(bias, heads), heads), bias)


def test_unpermute_moves_quantized_rows_whole():
    weights = np.random.default_rng(1).standard_normal((32, 64)).astype(np.float32)
    permuted = quants.quantize(converter_permute(weights, 4), Q.Q8_0)
    restored = quants.dequantize(unpermute_rows(permuted, 4), Q.Q8_0)
    assert np.array_equal(restored, quants.dequantize(quants.quantize(weights, Q.Q8_0), Q.Q8_0))


def test_unpermute_rejects_rows_that_do_not_split_into_heads():
    with pytest.raises(ModelLoadError, match="rotary heads"):
        unpermute_rows(np.zeros((6, 2)), 4)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0])
def test_block_dequantizers_match_gguf_reference(qtype, monkeypatch):
    monkeypatch.setattr(gguf_tensors, "DEQUANT_CHUNK_ELEMENTS", 3 * 96)  # several chunks
    weights = np.random.default_rng(2).standard_normal((10, 96)).astype(np.float32)
    raw = quants.quantize(weights, qtype)
    tensor = GGUFTensor("w", "w", qtype, (10, 96), raw)
    expected = torch.from_numpy(quants.dequantize(raw, qtype))
    assert torch.equal(dequantize(tensor, torch.float32), expected)
    assert torch.equal(dequantize(tensor, torch.bfloat16), expected.bfloat16())


def test_q8_0_blocks_are_values_and_group_scales():
    weights = np.random.default_rng(3).standard_normal((3, 64)).astype(np.float32)
    values, scales = q8_0_blocks(quants.quantize(weights, Q.Q8_0))
    assert values.dtype == torch.int8 and values.shape == (3, 64)
    assert scales.dtype == torch.float16 and scales.shape == (3, 2)
    rebuilt = values.float().view(3, 2, 32) * scales.float().unsqueeze(-1)
    assert np.allclose(rebuilt.reshape(3, 64).numpy(), weights, atol=float(scales.max()) / 2 + 1e-3)


def test_q4_0_blocks_are_file_order_bytes_and_group_scales():
    weights = np.random.default_rng(4).standard_normal((2, 64)).astype(np.float32)
    raw = quants.quantize(weights, Q.Q4_0)
    packed, scales = q4_0_blocks(raw)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 32) and scales.shape == (2, 2)
    nibbles = torch.cat((packed.view(2, 2, 16) & 0x0F, packed.view(2, 2, 16) >> 4), dim=-1)
    rebuilt = (nibbles.float() - 8) * scales.float().unsqueeze(-1)
    assert np.array_equal(rebuilt.reshape(2, 64).numpy(), quants.dequantize(raw, Q.Q4_0))


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0])
def test_blocks_map_onto_the_quantized_modules_without_a_float_step(qtype):
    modules = pytest.importorskip("agentcpu.quant.modules")
    weights = np.random.default_rng(5).standard_normal((6, 128)).astype(np.float32)
    raw = quants.quantize(weights, qtype)
    if qtype == Q.Q8_0:
        layer = modules.Int8Linear.from_q8_0(*q8_0_blocks(raw))
    else:
        layer = modules.Int4Linear.from_q4_0(*q4_0_blocks(raw))
    expected = dequantize(GGUFTensor("w", "w", qtype, (6, 128), raw), torch.float32)
    assert torch.allclose(layer.dequantized_weight(), expected, rtol=0, atol=1e-6)


def test_bf16_and_f16_are_viewed_not_converted():
    weights = torch.randn(4, 8)
    bf16_bytes = weights.bfloat16().view(torch.int16).numpy().view(np.uint8)
    tensor = GGUFTensor("w", "w", Q.BF16, (4, 8), bf16_bytes)
    assert torch.equal(dequantize(tensor, torch.float32), weights.bfloat16())
    half = weights.half().numpy()
    assert torch.equal(
        dequantize(GGUFTensor("w", "w", Q.F16, (4, 8), half), torch.float32), weights.half()
    )


@pytest.mark.parametrize(
    "gguf_name,hf_name",
    [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output.weight", "lm_head.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("blk.0.attn_norm.weight", "model.layers.0.input_layernorm.weight"),
        ("blk.11.ffn_norm.weight", "model.layers.11.post_attention_layernorm.weight"),
        ("blk.3.attn_q.bias", "model.layers.3.self_attn.q_proj.bias"),
        ("blk.3.attn_output.weight", "model.layers.3.self_attn.o_proj.weight"),
        ("blk.2.attn_k_norm.weight", "model.layers.2.self_attn.k_norm.weight"),
        ("blk.7.ffn_down.weight", "model.layers.7.mlp.down_proj.weight"),
    ],
)
def test_tensor_names(gguf_name, hf_name):
    assert hf_tensor_name(gguf_name) == hf_name


@pytest.mark.parametrize("name", ["blk.0.ffn_gate_exps.weight", "output.bias", "pos_embd.weight"])
def test_unknown_tensor_names_are_refused(name):
    with pytest.raises(ModelLoadError, match=name):
        hf_tensor_name(name)


def converter_rope_factors(head_dim, base, factor, low, high, original):
    """convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors (llama3 rope_freqs)."""
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    low_wavelen, high_wavelen = original / low, original / high
    factors = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < high_wavelen:
            factors.append(1)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32).astype(np.float64)


@pytest.mark.parametrize(
    "head_dim,base,factor,low,high,original",
    [
        (128, 500000.0, 8.0, 1.0, 4.0, 8192),  # Llama 3.1
        (64, 500000.0, 32.0, 1.0, 4.0, 8192),  # Llama 3.2 1B/3B
        (16, 10000.0, 8.0, 1.0, 4.0, 64),  # the fixture
        (16, 10000.0, 4.0, 2.0, 8.0, 128),  # low_freq_factor != 1: same curve, lf = 1
        (8, 10000.0, 8.0, 1.0, 1.5, 64),  # one frequency in the blend: not identifiable
        (8, 10000.0, 8.0, 1.0, 1.2, 1000),  # none in the blend: not identifiable
    ],
)
def test_llama3_scaling_reproduces_rope_freqs(head_dim, base, factor, low, high, original):
    factors = converter_rope_factors(head_dim, base, factor, low, high, original)
    scaling = llama3_scaling_from_factors(factors, head_dim, base)
    rebuilt, _ = rope_inv_freq(head_dim, base, scaling, 0)
    expected = base ** (-np.arange(0, head_dim, 2) / head_dim) / factors
    assert np.allclose(rebuilt.double().numpy(), expected, rtol=1e-5)
    in_blend = ~np.isclose(factors, 1.0) & ~np.isclose(factors, factor)
    if low == 1.0 and in_blend.sum() >= 2:
        assert scaling["original_max_position_embeddings"] == original
        assert scaling["high_freq_factor"] == high


def test_rope_freqs_of_ones_mean_no_scaling():
    assert llama3_scaling_from_factors(np.ones(8), 16, 10000.0) is None


def test_rope_freqs_that_are_not_llama3_are_refused():
    factors = np.linspace(1.0, 3.0, 8)[::-1].copy()
    with pytest.raises(UnsupportedModelError, match="rope_freqs"):
        llama3_scaling_from_factors(factors, 16, 10000.0)
