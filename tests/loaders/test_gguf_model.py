"""agentcpu on a GGUF converted by llama.cpp matches agentcpu on the source checkpoint.

Float GGUFs hold the checkpoint's weights exactly (the fixture weights are bf16 values
that f16 holds too), so greedy tokens and logits must be identical. Quantized GGUFs
are checked at the weight level (dequantized error within the format's bound, which
also proves the q/k row order) and at the output level (top-1 agreement).
"""

from __future__ import annotations

import functools

import pytest
import torch
from safetensors.torch import load_file

from agentcpu.config import ModelConfig
from agentcpu.loaders.gguf_file import GGUFModelFile
from agentcpu.loaders.gguf_tensors import iter_hf_tensors
from tests.engine.helpers import greedy, make_engine, random_prompts, run_all
from tests.loaders.gguf_cases import (
    all_model_files,
    engine,
    gguf_path,
    hf_dir,
    row_relative_error,
    scoring_prompts,
    top1_agreement,
)

FLOAT_CASES = [("llama-spm", "f16"), ("llama-spm", "bf16"), ("qwen2-bpe", "f16"),
               ("qwen2-bpe", "bf16"), ("qwen3-bpe", "f16")]  # fmt: skip
# Worst per-row relative RMS error of a dequantized matrix (measured: Q8_0 0.008,
# Q6_K 0.021, Q4_K 0.086, Q4_0 0.127).
WEIGHT_ERROR_BOUND = {"q8_0": 0.015, "q6_k": 0.04, "q4_k": 0.12, "q4_0": 0.16}
# Top-1 agreement with the source model over 384 prompt positions (measured: Q8_0
# 0.992-0.997, Q6_K 0.969, Q4_K 0.859, Q4_0 0.857-0.888).
TOP1_BOUND = {"q8_0": 0.98, "q6_k": 0.95, "q4_k": 0.75, "q4_0": 0.75}


@functools.cache
def hf_engine(name: str):
    return engine(hf_dir(name))


@pytest.mark.parametrize("name,gguf_type", all_model_files())
def test_config_matches_config_json(name, gguf_type):
    from_gguf = GGUFModelFile(gguf_path(name, gguf_type)).model_config()
    assert from_gguf == ModelConfig.from_model_dir(hf_dir(name))


def test_llama3_rope_scaling_is_rebuilt_from_rope_freqs():
    gguf = GGUFModelFile(gguf_path("llama-spm", "f16"))
    assert "rope_freqs.weight" in gguf.tensors
    assert gguf.model_config().rope_scaling == {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
    }  # fmt: skip


@pytest.mark.parametrize("name,gguf_type", FLOAT_CASES)
def test_float_gguf_gives_the_same_greedy_tokens(name, gguf_type):
    reference, model = hf_engine(name), engine(gguf_path(name, gguf_type))
    vocab = reference.config.model_config.vocab_size
    prompts = random_prompts(4, [5, 17, 40], vocab=vocab, seed=3)
    assert run_all(model, prompts, greedy(16)) == run_all(reference, prompts, greedy(16))
    assert torch.equal(model.prompt_logits(prompts[2]), reference.prompt_logits(prompts[2]))


@pytest.mark.parametrize(
    "name,gguf_type",
    [("llama-spm", "q8_0"), ("qwen2-bpe", "q8_0"), ("qwen3-bpe", "q8_0"),
     ("llama-spm", "q4_0"), ("qwen2-bpe", "q4_0"),
     ("llama3-kquant", "q4_k"), ("llama3-kquant", "q6_k")],
)  # fmt: skip
def test_quantized_gguf_weights_are_within_the_format_error(name, gguf_type):
    gguf = GGUFModelFile(gguf_path(name, gguf_type))
    reference = load_file(hf_dir(name) / "model.safetensors")
    matrices = 0
    for hf_name, weight in iter_hf_tensors(gguf, gguf.model_config(), torch.float32):
        expected = reference[hf_name]
        if expected.dim() == 1:  # norms and biases stay F32 in every GGUF type
            assert torch.equal(weight.float(), expected.float()), hf_name
            continue
        matrices += 1
        error = row_relative_error(weight, expected)
        assert error < WEIGHT_ERROR_BOUND[gguf_type], f"{hf_name}: {error:.4f}"
    assert matrices >= 7


@pytest.mark.parametrize(
    "name,gguf_type",
    [("llama-spm", "q8_0"), ("qwen2-bpe", "q8_0"), ("qwen3-bpe", "q8_0"),
     ("llama-spm", "q4_0"), ("qwen2-bpe", "q4_0"),
     ("llama3-kquant", "q4_k"), ("llama3-kquant", "q6_k")],
)  # fmt: skip
def test_quantized_gguf_agrees_on_the_next_token(name, gguf_type):
    reference, model = hf_engine(name), engine(gguf_path(name, gguf_type))
    prompts = scoring_prompts(reference.config.model_config.vocab_size)
    assert top1_agreement(model, reference, prompts) >= TOP1_BOUND[gguf_type]


@pytest.mark.parametrize("name", ["llama-spm", "qwen2-bpe"])
def test_chat_prompt_end_to_end_in_bfloat16(name):
    """The GGUF's own tokenizer and template, bf16 weights: the same tokens as the
    checkpoint directory in bf16 (its weights are bf16 already)."""
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    outputs = []
    for path in (hf_dir(name), gguf_path(name, "bf16")):
        model = make_engine(path, dtype="bfloat16", max_model_len=256, kv_cache_gb=0.02)
        prompt = model.tokenizer.encode(model.tokenizer.apply_chat_template(messages))
        outputs.append((prompt, run_all(model, [prompt], greedy(12))))
    assert outputs[0] == outputs[1]
