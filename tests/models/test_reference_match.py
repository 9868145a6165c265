"""agentcpu's decoder against transformers on random checkpoints of every family."""

from __future__ import annotations

import pytest
import torch

from agentcpu.engine.llm_engine import LLMEngine
from agentcpu.engine.sampling_params import SamplingParams
from agentcpu.models.loading import resolve_engine_config
from tests.models.reference import FAMILIES, load_reference

PROMPT_LEN = 64
GEN_LEN = 32


def _engine(path, dtype="float32") -> LLMEngine:
    cfg = resolve_engine_config(str(path), dtype=dtype, max_model_len=256, kv_cache_gb=0.01)
    return LLMEngine(cfg)


def _prompt(vocab: int, seed: int = 0) -> list[int]:
    return torch.randint(0, vocab, (PROMPT_LEN,), generator=torch.Generator().manual_seed(seed)).tolist()


def _generate(engine: LLMEngine, prompt: list[int], n: int) -> list[int]:
    engine.add_request(prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    tokens = []
    while engine.has_unfinished():
        for out in engine.step():
            tokens = out.token_ids
    return tokens


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fp32_logits_match(checkpoint_dir, family):
    path = checkpoint_dir(family)
    prompt = _prompt(512)
    with torch.no_grad():
        ref = load_reference(path)(torch.tensor([prompt])).logits[0]
    ours = _engine(path).prompt_logits(prompt)
    diff = (torch.log_softmax(ref, -1) - torch.log_softmax(ours, -1)).abs().max().item()
    assert diff < 1e-4, f"{family}: max |log-softmax diff| {diff}"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fp32_greedy_matches_generate(checkpoint_dir, family):
    path = checkpoint_dir(family)
    prompt = _prompt(512, seed=1)
    ref = load_reference(path)
    expected = ref.generate(
        torch.tensor([prompt]),
        max_new_tokens=GEN_LEN,
        min_new_tokens=GEN_LEN,
        do_sample=False,
        pad_token_id=0,
    )[0, PROMPT_LEN:].tolist()
    assert _generate(_engine(path), prompt, GEN_LEN) == expected


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bf16_top1_agrees(checkpoint_dir, family):
    """bf16 against the reference run in bf16 (>= 99 %) and in fp32 (>= 95 %: tiny random
    models have many near-tied logits, which bf16 rounding legitimately flips). Twelve
    prompts: a fused op that sums in another order flips a bf16 rounding now and then,
    which on 4 prompts alone moved qwen3 from 99.6 to 98.8 % (at 24 prompts fused and
    unfused agree with the fp32 reference equally, 98.1 vs 98.2 %)."""
    path = checkpoint_dir(family)
    prompts = [_prompt(512, seed=s) for s in range(12)]
    ref32, ref16 = load_reference(path), load_reference(path, torch.bfloat16)
    engine = _engine(path, dtype="bfloat16")
    agree16 = agree32 = total = 0
    for prompt in prompts:
        with torch.no_grad():
            expected32 = ref32(torch.tensor([prompt])).logits[0].argmax(-1)
            expected16 = ref16(torch.tensor([prompt])).logits[0].argmax(-1)
        got = engine.prompt_logits(prompt).argmax(-1)
        agree16 += int((expected16 == got).sum())
        agree32 += int((expected32 == got).sum())
        total += len(prompt)
    assert agree16 / total >= 0.99, f"{family}: top-1 agreement with bf16 reference {agree16 / total:.3f}"
    assert agree32 / total >= 0.95, f"{family}: top-1 agreement with fp32 reference {agree32 / total:.3f}"


def test_sharded_checkpoint(checkpoint_dir):
    path = checkpoint_dir("qwen2", max_shard_size="200KB")
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("*.safetensors"))) > 1
    prompt = _prompt(512, seed=2)
    with torch.no_grad():
        ref = load_reference(path)(torch.tensor([prompt])).logits[0]
    ours = _engine(path).prompt_logits(prompt)
    assert (torch.log_softmax(ref, -1) - torch.log_softmax(ours, -1)).abs().max() < 1e-4


def test_rope_scaling_llama31_matters(checkpoint_dir):
    """The llama3 rope scaling is applied (a model without it gives other logits)."""
    scaled = checkpoint_dir("llama")
    plain = checkpoint_dir("llama", rope_scaling=None)
    prompt = _prompt(512, seed=3)
    a, b = _engine(scaled).prompt_logits(prompt), _engine(plain).prompt_logits(prompt)
    assert (a - b).abs().max() > 1e-3
