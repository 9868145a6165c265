"""The committed GGUF fixtures (made by scripts/make_gguf_fixtures.py) and helpers.

Each fixture directory holds `hf/` (a tiny random Hugging Face checkpoint with its
tokenizer) and `model-<type>.gguf` files converted from it by llama.cpp's own tools.
"""

from __future__ import annotations

from pathlib import Path

import torch

from agentcpu.engine.llm_engine import LLMEngine
from tests.engine.helpers import make_engine, random_prompts

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "gguf"
# fixture -> its model GGUF types
MODEL_FILES = {
    "llama-spm": ("f16", "bf16", "q8_0", "q4_0"),
    "qwen2-bpe": ("f16", "bf16", "q8_0", "q4_0"),
    "qwen3-bpe": ("f16", "q8_0"),
    "llama3-kquant": ("q4_k", "q6_k"),
}
# fixture -> a GGUF carrying its tokenizer
TOKENIZER_FILES = {
    "llama-spm": "model-f16.gguf",
    "qwen2-bpe": "model-f16.gguf",
    "qwen3-bpe": "model-f16.gguf",
    "llama3-kquant": "model-q4_k.gguf",
    "llama-hfspm": "vocab.gguf",
}


def hf_dir(name: str) -> Path:
    return FIXTURES / name / "hf"


def gguf_path(name: str, gguf_type: str) -> Path:
    return FIXTURES / name / f"model-{gguf_type}.gguf"


def all_model_files() -> list[tuple[str, str]]:
    return [(name, t) for name, types in MODEL_FILES.items() for t in types]


def engine(path: Path) -> LLMEngine:
    return make_engine(path, dtype="float32", max_model_len=256, kv_cache_gb=0.02)


def scoring_prompts(vocab_size: int) -> list[list[int]]:
    """8 prompts, 384 positions: enough for a top-1 agreement in steps of 0.3 %."""
    return random_prompts(8, [32, 64], vocab=vocab_size, seed=7)


def top1_agreement(engine_a: LLMEngine, engine_b: LLMEngine, prompts: list[list[int]]) -> float:
    same = total = 0
    for prompt in prompts:
        a, b = engine_a.prompt_logits(prompt), engine_b.prompt_logits(prompt)
        same += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += len(prompt)
    return same / total


def row_relative_error(weight: torch.Tensor, reference: torch.Tensor) -> float:
    """Worst per-row RMS error relative to the row's RMS (rows differ in scale)."""
    diff = (weight.float() - reference.float()).pow(2).mean(-1).sqrt()
    return float((diff / reference.float().pow(2).mean(-1).sqrt()).max())
