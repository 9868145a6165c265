"""quantize_model / apply_quant on tiny random checkpoints, through the real loader.

Agreement thresholds (measured on these models, 4 x 64 random prompt tokens):
- int8 against the float model: top-1 94-98 %, relative logit error 2-3.5 % -> assert
  >= 90 % and <= 6 %. Random tiny models have many near-tied logits, so a small
  perturbation legitimately flips some argmaxes.
- int4 against the float model flips 25-45 % of them (relative logit error 20-45 %: 4 bits
  of random Gaussian weights); that is the format's own error, so int4 is checked against
  the float model run with the *dequantized* int4 weights, which must match as closely as
  int8 matches float (only activation rounding differs).
"""

from __future__ import annotations

import pytest
import torch

from agentcpu.errors import InvalidRequestError
from agentcpu.layers.linear import Linear
from agentcpu.quant import (
    Int4Linear,
    Int8Linear,
    QuantizationError,
    apply_quant,
    interleave_int4_layers,
    lay_out_int8_layers,
    ops,
    parse_quant,
    quantize_model,
)
from agentcpu.quant.kernels import kernels
from tests.engine.helpers import make_engine

PROMPTS = 4
PROMPT_LEN = 64


def _prompts(vocab=512):
    return [
        torch.randint(0, vocab, (PROMPT_LEN,), generator=torch.Generator().manual_seed(s)).tolist()
        for s in range(PROMPTS)
    ]


def _logits(engine):
    return [engine.prompt_logits(p) for p in _prompts()]


def _compare(ref, got) -> tuple[float, float]:
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(ref, got, strict=True))
    rel = max(((a - b).norm() / a.norm()).item() for a, b in zip(ref, got, strict=True))
    return agree / (PROMPTS * PROMPT_LEN), rel


def _linears(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, Linear)}


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_every_linear_is_swapped_and_biases_kept(checkpoint_dir, family, method):
    engine = make_engine(checkpoint_dir(family))
    before = {n: (m.in_features, m.out_features, m.bias) for n, m in _linears(engine.model).items()}
    quantize_model(engine.model, method, group_size=64)
    kind = Int8Linear if method == "int8" else Int4Linear
    after = {
        n: m for n, m in engine.model.named_modules() if isinstance(m, (Int8Linear, Int4Linear))
    }
    assert not _linears(engine.model)
    assert set(after) == set(before) | {"lm_head"}  # a tied head gets its own int8 copy
    assert isinstance(after.pop("lm_head"), Int8Linear)  # int8 under int4 too
    assert all(isinstance(m, kind) for m in after.values())
    before.pop("lm_head", None)
    for name, (k, n, bias) in before.items():
        assert (after[name].in_features, after[name].out_features) == (k, n)
        assert (bias is None) == (after[name].bias is None)
        if bias is not None:
            assert torch.equal(after[name].bias, bias)
    assert any(m.bias is not None for m in after.values()) == (family == "qwen2")


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("panels", [False, True])
def test_int8_logits_close_to_float(checkpoint_dir, family, dtype, panels):
    """`panels`: the layout the loader gives per-channel int8 layers on VNNI CPUs."""
    path = checkpoint_dir(family)
    ref = _logits(make_engine(path, dtype=dtype))
    engine = make_engine(path, dtype=dtype)
    apply_quant(engine.model, "int8")
    if panels:
        if not ops.vnni_path():
            pytest.skip("no int8 VNNI kernel here: layers keep the row layout")
        assert lay_out_int8_layers(engine.model) == len(
            [m for m in engine.model.modules() if isinstance(m, Int8Linear)]
        )
    agree, rel = _compare(ref, _logits(engine))
    assert agree >= 0.90 and rel <= 0.06, f"top-1 {agree:.3f}, relative error {rel:.4f}"


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("quant", ["int4-g32", "int4", "int4-g128-sym"])
@pytest.mark.parametrize("interleave", [False, True])
def test_int4_logits_match_dequantized_float_model(checkpoint_dir, family, quant, interleave):
    """`interleave`: the layout the loader gives int4 layers where the kernels exist."""
    path = checkpoint_dir(family)
    fake = make_engine(path)
    method, group, symmetric = parse_quant(quant)
    quantized_model = quantize_model(fake.model, method, group, symmetric)
    if interleave:
        if kernels() is None:
            pytest.skip("no compiled kernels here: layers keep the row layout")
        assert interleave_int4_layers(quantized_model) > 0
    ref_model = make_engine(path)
    ref_linears = _linears(ref_model.model)
    for name, module in quantized_model.named_modules():
        if isinstance(module, Int4Linear):
            ref_linears[name].weight.data.copy_(module.dequantized_weight())
    head = quantized_model.lm_head.dequantized_weight()  # int8, also when tied
    ref_model.model.lm_head = Linear(head.shape[1], head.shape[0], False, torch.float32)
    ref_model.model.lm_head.weight.data.copy_(head)
    agree, rel = _compare(_logits(ref_model), _logits(fake))
    assert agree >= 0.90 and rel <= 0.06, f"{quant}: top-1 {agree:.3f}, relative error {rel:.4f}"


def test_group_size_must_divide_every_layer(checkpoint_dir):
    engine = make_engine(checkpoint_dir("llama", hidden_size=96, intermediate_size=192))
    with pytest.raises(QuantizationError, match="multiple of the group size 64"):
        quantize_model(engine.model, "int4", group_size=64)
    assert _linears(engine.model), "a failed quantization leaves the model unchanged"


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("int8", ("int8", 128, False)),
        ("int4", ("int4", 128, False)),
        ("int4-g64", ("int4", 64, False)),
        ("INT4-g32-sym", ("int4", 32, True)),
    ],
)
def test_parse_quant(text, parsed):
    assert parse_quant(text) == parsed


@pytest.mark.parametrize("text", ["int3", "int4-g48", "int8-g32", "fp8", "int4-sym-g32"])
def test_parse_quant_rejects(text):
    with pytest.raises(InvalidRequestError):
        parse_quant(text)


def test_apply_quant_none_leaves_model(checkpoint_dir):
    engine = make_engine(checkpoint_dir("llama"))
    assert apply_quant(engine.model, None) is engine.model
    assert _linears(engine.model)
