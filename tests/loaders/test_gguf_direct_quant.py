"""GGUF Q8_0 / Q4_0 (and Q4_1) linear weights load straight into Int8Linear /
Int4Linear: the same weights bit for bit as gguf's own dequantization, no float step.

The reference for outputs is a float model holding the file's weights as `gguf`
dequantizes them (the old load path); the quantized model may differ from it only by
the kernels' activation rounding.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from agentcpu.engine.llm_engine import LLMEngine
from agentcpu.errors import ModelLoadError
from agentcpu.layers.linear import Linear
from agentcpu.loaders.gguf_file import GGUFModelFile
from agentcpu.loaders.gguf_tensors import (
    PERMUTED_QK_ARCHITECTURES,
    QUANTIZED_FORMATS,
    exact_format,
    hf_tensor_name,
    iter_hf_tensors,
    unpermute_rows,
)
from agentcpu.models.loader import DTYPES, build_model, load_weights
from agentcpu.models.loading import load_gguf_model, resolve_engine_config
from agentcpu.quant import Int4Linear, Int8Linear
from tests.loaders.gguf_cases import engine, gguf_path, scoring_prompts, top1_agreement

Q = GGMLQuantizationType
DIRECT_FILES = [("llama-spm", "q8_0"), ("qwen2-bpe", "q8_0"), ("qwen3-bpe", "q8_0"),
                ("llama-spm", "q4_0"), ("qwen2-bpe", "q4_0")]  # fmt: skip
MODULE_FOR = {"q8_0": Int8Linear, "q4_0": Int4Linear}
# Against the float model with the same (dequantized) weights, over 384 prompt positions
# (fp32, AVX2 GEMV kernels). Measured: top-1 0.990-0.997 (Q8_0 and Q4_0 alike), worst
# relative logit error per prompt 0.010-0.012: the kernels round activations to int8
# blocks of 32, nothing else differs.
TOP1_BOUND = 0.98
BF16_TOP1_BOUND = 0.95
LOGIT_ERROR_BOUND = 0.03
# gguf_tensors.hf_tensor_name's names of the parts of our fused layers, in row order.
FUSED_PARTS = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def _config(path, dtype="float32", quant=None):
    return resolve_engine_config(
        str(path), dtype=dtype, max_model_len=256, kv_cache_gb=0.02, quant=quant
    )


def _float_model(gguf: GGUFModelFile, dtype="float32"):
    """The old path: every tensor dequantized into a float model."""
    cfg = gguf.model_config()
    model = build_model(cfg, dtype, 256)
    load_weights(model, iter_hf_tensors(gguf, cfg, DTYPES[dtype]))
    return model


@functools.cache
def _float_engine(name: str, gguf_type: str) -> LLMEngine:
    path = gguf_path(name, gguf_type)
    return LLMEngine(_config(path), _float_model(GGUFModelFile(path)))


def _gguf_weights(gguf: GGUFModelFile) -> dict[str, torch.Tensor]:
    """HF name -> the weight as `gguf.quants.dequantize` gives it, q/k rows put back in
    Hugging Face order (on floats, after dequantizing)."""
    cfg = gguf.model_config()
    weights = {}
    for gguf_name, info in gguf.tensors.items():
        if gguf_name == "rope_freqs.weight":
            continue
        values = quants.dequantize(np.asarray(info.data), info.ggml_type).reshape(info.shape)
        if gguf.architecture in PERMUTED_QK_ARCHITECTURES:
            heads = {"attn_q": cfg.num_heads, "attn_k": cfg.num_kv_heads}.get(
                gguf_name.split(".")[-2]
            )
            values = unpermute_rows(values, heads) if heads else values
        weights[hf_tensor_name(gguf_name)] = torch.from_numpy(np.ascontiguousarray(values))
    return weights


def _expected(weights: dict[str, torch.Tensor], path: str, kind: str) -> torch.Tensor:
    """A layer's weight or bias from its checkpoint parts, concatenated in row order."""
    prefix, _, leaf = path.rpartition(".")
    parent_leaf = f"{prefix.rpartition('.')[2]}.{leaf}"
    parts = FUSED_PARTS.get(parent_leaf)
    if parts is None:
        return weights[f"{path}.{kind}"]
    base = prefix.rpartition(".")[0]
    return torch.cat([weights[f"{base}.{part}.{kind}"] for part in parts])


def _layers(model, kind=(Linear, Int8Linear, Int4Linear)):
    return {name: m for name, m in model.named_modules() if isinstance(m, kind)}


def _assert_exact(model, gguf: GGUFModelFile):
    """Every layer's (dequantized) weight and bias equal gguf's dequantization."""
    weights = _gguf_weights(gguf)
    for path, layer in _layers(model).items():
        got = layer.weight if isinstance(layer, Linear) else layer.dequantized_weight()
        if path == "lm_head" and "lm_head.weight" not in weights:  # tied: the embedding's blocks
            assert torch.equal(got.float(), weights["model.embed_tokens.weight"]), path
            continue
        assert torch.equal(got.float(), _expected(weights, path, "weight")), path
        if layer.bias is not None:
            assert torch.equal(layer.bias.float(), _expected(weights, path, "bias")), path


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _model_bytes(model) -> int:
    """Parameters and buffers, without the rope table."""
    tensors = [*model.parameters(), *model.buffers()]
    return _bytes(t for t in tensors if t is not model.rope.cos_sin)


def _load(gguf: GGUFModelFile, dtype="float32", quant=None):
    return load_gguf_model(gguf, _config(gguf.path, dtype, quant))


def _retyped(gguf: GGUFModelFile, changes: dict[str, GGMLQuantizationType]) -> GGUFModelFile:
    """The file with some tensors re-encoded in another ggml type (in memory), from
    their dequantized values, as llama.cpp's quantizer mixes types in one file."""
    for name, qtype in changes.items():
        info = gguf.tensors[name]
        values = quants.dequantize(np.asarray(info.data), info.ggml_type).reshape(info.shape)
        data = quants.quantize(values.astype(np.float32), qtype)
        gguf.tensors[name] = dataclasses.replace(info, ggml_type=qtype, data=data)
    return gguf


@pytest.mark.parametrize("name,gguf_type", DIRECT_FILES)
def test_linear_layers_become_quantized_modules_with_the_files_weights(name, gguf_type):
    gguf = GGUFModelFile(gguf_path(name, gguf_type))
    model = _load(gguf)
    layers = _layers(model)
    assert len(layers) >= 8
    assert all(type(m) is MODULE_FOR[gguf_type] for m in layers.values()), layers
    assert all(m.weight_data.group_size == 32 for m in layers.values())
    _assert_exact(model, gguf)


@pytest.mark.parametrize("gguf_type", ["q8_0", "q4_0"])
def test_a_tied_embedding_in_blocks_is_also_the_head_as_blocks(gguf_type):
    """llama-spm ties its head: logits read the file's blocks (no --quant needed); the
    embedding keeps a float table for the lookup."""
    gguf = GGUFModelFile(gguf_path("llama-spm", gguf_type))
    model = _load(gguf)
    assert type(model.lm_head) is MODULE_FOR[gguf_type]
    assert model.model.embed_tokens.weight.dtype == torch.float32
    _assert_exact(model, gguf)


@pytest.mark.parametrize("name,gguf_type", DIRECT_FILES)
def test_outputs_match_the_float_model_with_the_same_weights(name, gguf_type):
    reference, model = _float_engine(name, gguf_type), engine(gguf_path(name, gguf_type))
    assert isinstance(model.model.model.layers[0].mlp.down_proj, MODULE_FOR[gguf_type])
    prompts = scoring_prompts(reference.config.model_config.vocab_size)
    assert top1_agreement(model, reference, prompts) >= TOP1_BOUND
    for prompt in prompts[:3]:
        a, b = reference.prompt_logits(prompt), model.prompt_logits(prompt)
        assert float((a - b).norm() / a.norm()) <= LOGIT_ERROR_BOUND


@pytest.mark.parametrize("name,gguf_type", [("qwen2-bpe", "q8_0"), ("llama-spm", "q4_0")])
def test_bfloat16_models_agree_too(name, gguf_type):
    """Measured: top-1 1.000 (Q8_0), 0.979 (Q4_0) against the bf16 float model."""
    path = gguf_path(name, gguf_type)
    reference = LLMEngine(_config(path, "bfloat16"), _float_model(GGUFModelFile(path), "bfloat16"))
    model = LLMEngine(_config(path, "bfloat16"))
    prompts = scoring_prompts(reference.config.model_config.vocab_size)
    assert top1_agreement(model, reference, prompts) >= BF16_TOP1_BOUND


@pytest.mark.parametrize("gguf_type,bytes_per_weight", [("q8_0", 1 + 4 / 32), ("q4_0", 0.625)])
def test_memory_is_the_quantized_size(gguf_type, bytes_per_weight):
    gguf = GGUFModelFile(gguf_path("qwen2-bpe", gguf_type))
    model, reference = _load(gguf, "bfloat16"), _float_model(gguf, "bfloat16")
    layers = _layers(model).values()
    weights = sum(m.in_features * m.out_features for m in layers)
    assert _bytes(t for m in layers for n, t in m.named_buffers() if n != "bias") == (
        weights * bytes_per_weight
    )
    # everything else (embedding, norms, biases) is the same bf16 in both
    assert _model_bytes(reference) - _model_bytes(model) == weights * (2 - bytes_per_weight)


def test_the_load_is_summarised_in_one_line(caplog):
    with caplog.at_level(logging.INFO, logger="agentcpu.models.loading"):
        engine(gguf_path("qwen2-bpe", "q8_0"))
    assert (
        "GGUF Q8_0 weights -> int8 modules (15 tensors), "
        "12 tensors dequantized (F32 x11, Q8_0 x1)" in caplog.text
    )


def test_k_quant_files_keep_the_float_path(caplog):
    with caplog.at_level(logging.INFO, logger="agentcpu.models.loading"):
        model = engine(gguf_path("llama3-kquant", "q6_k")).model
    assert not _layers(model, (Int8Linear, Int4Linear)) and _layers(model, Linear)
    assert "no direct int8/int4 modules" in caplog.text


# -- one fused layer, parts of different types ------------------------------------------


def test_q4_0_parts_join_q8_0_parts_in_int8_exactly():
    gguf = _retyped(GGUFModelFile(gguf_path("qwen2-bpe", "q8_0")),
                    {"blk.0.attn_q.weight": Q.Q4_0, "blk.0.attn_k.weight": Q.Q4_0})  # fmt: skip
    model = _load(gguf)
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, Int8Linear)
    _assert_exact(model, gguf)


def test_q8_0_part_makes_a_q4_0_layer_int8_exactly():
    gguf = _retyped(GGUFModelFile(gguf_path("llama-spm", "q4_0")),
                    {"blk.1.attn_v.weight": Q.Q8_0})  # fmt: skip
    model = _load(gguf)
    assert isinstance(model.model.layers[1].self_attn.qkv_proj, Int8Linear)
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, Int4Linear)
    _assert_exact(model, gguf)


def test_q4_1_parts_load_into_int4_exactly():
    gguf = _retyped(GGUFModelFile(gguf_path("qwen2-bpe", "q4_0")),
                    {"blk.0.ffn_up.weight": Q.Q4_1, "blk.1.ffn_down.weight": Q.Q4_1})  # fmt: skip
    model = _load(gguf)
    assert isinstance(model.model.layers[0].mlp.gate_up_proj, Int4Linear)
    assert isinstance(model.model.layers[1].mlp.down_proj, Int4Linear)
    _assert_exact(model, gguf)


@pytest.mark.parametrize("qtype", [Q.F16, Q.Q5_0, Q.BF16])
def test_a_part_without_an_exact_form_keeps_the_whole_layer_float(qtype, caplog):
    gguf = _retyped(GGUFModelFile(gguf_path("qwen2-bpe", "q8_0")), {"blk.0.attn_v.weight": qtype})
    with caplog.at_level(logging.INFO, logger="agentcpu.models.loading"):
        model = _load(gguf)
    assert type(model.model.layers[0].self_attn.qkv_proj) is Linear
    assert isinstance(model.model.layers[1].self_attn.qkv_proj, Int8Linear)
    _assert_exact(model, gguf)
    assert "-> int8 modules (12 tensors)" in caplog.text


def test_a_missing_part_is_named():
    gguf = GGUFModelFile(gguf_path("qwen2-bpe", "q8_0"))
    del gguf.tensors["blk.1.attn_k.weight"]
    with pytest.raises(
        ModelLoadError, match=r"missing tensor\(s\) model.layers.1.self_attn.k_proj"
    ):
        _load(gguf)


def test_a_direct_part_of_the_wrong_shape_is_named():
    gguf = GGUFModelFile(gguf_path("qwen2-bpe", "q8_0"))
    name = "blk.0.ffn_up.weight"
    info = gguf.tensors[name]
    gguf.tensors[name] = dataclasses.replace(info, shape=(64, 128), data=info.data.reshape(64, -1))
    with pytest.raises(ModelLoadError, match=r"mlp.up_proj.weight.*\(64, 128\).*\(128, 64\)"):
        _load(gguf)


# -- an explicit --quant -----------------------------------------------------------------


def test_quant_of_the_same_method_keeps_the_files_blocks():
    gguf = GGUFModelFile(gguf_path("llama-spm", "q4_0"))
    model = engine_model(gguf, "int4-g128")
    layers = _layers(model)
    assert all(type(m) is Int4Linear and m.weight_data.group_size == 32
               for m in layers.values())  # fmt: skip
    _assert_exact(model, gguf)


def test_quant_int8_holds_q4_0_exactly():
    gguf = GGUFModelFile(gguf_path("qwen2-bpe", "q4_0"))
    model = engine_model(gguf, "int8")
    assert all(type(m) is Int8Linear for m in _layers(model).values())
    _assert_exact(model, gguf)


def test_quant_int4_on_q8_0_requantizes_the_dequantized_weights_and_says_so(caplog):
    with caplog.at_level(logging.INFO, logger="agentcpu.models.loading"):
        model = engine_model(GGUFModelFile(gguf_path("qwen2-bpe", "q8_0")), "int4-g64")
    layers = _layers(model)
    head = layers.pop("lm_head")  # the head stays int8 under int4: the file's Q8_0 blocks
    assert type(head) is Int8Linear and head.weight_data.group_size == 32
    assert all(type(m) is Int4Linear and m.weight_data.group_size == 64 for m in layers.values())
    assert "--quant int4-g64: 14 linear weights (Q8_0 x14) dequantized at load" in caplog.text
    assert "quantized twice" in caplog.text


def engine_model(gguf: GGUFModelFile, quant: str):
    """The model as the engine loads it (`load_model_and_tokenizer`: then `apply_quant`)."""
    return LLMEngine(_config(gguf.path, quant=quant)).model


# -- the mapping rule ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "types,allowed,expected",
    [
        ([Q.Q8_0], QUANTIZED_FORMATS, "int8"),
        ([Q.Q4_0, Q.Q4_0, Q.Q4_1], QUANTIZED_FORMATS, "int4"),
        ([Q.Q4_0, Q.Q8_0], QUANTIZED_FORMATS, "int8"),  # Q4_0 values fit int8 exactly
        ([Q.Q4_1, Q.Q8_0], QUANTIZED_FORMATS, None),  # Q4_1's minimum has no int8 form
        ([Q.Q8_0, Q.F16], QUANTIZED_FORMATS, None),
        ([Q.Q6_K], QUANTIZED_FORMATS, None),
        ([Q.Q4_0], ("int8",), "int8"),
        ([Q.Q8_0], ("int4",), None),
        ([], QUANTIZED_FORMATS, None),
        ([None], QUANTIZED_FORMATS, None),  # a missing part
    ],
)
def test_exact_format_is_the_smallest_that_holds_every_part(types, allowed, expected):
    assert exact_format(types, allowed) == expected
