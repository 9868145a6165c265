"""Small random-weight checkpoints built with `transformers` (the test-time reference)."""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = {
    "llama": dict(
        model_type="llama",
        rope_theta=10000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        tie_word_embeddings=True,
    ),
    "qwen2": dict(model_type="qwen2", rope_theta=1e6, tie_word_embeddings=False),
    "qwen3": dict(model_type="qwen3", rope_theta=1e6, head_dim=32, tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", rope_theta=1e4, tie_word_embeddings=False),
}


def make_checkpoint(
    path: Path,
    family: str,
    seed: int = 0,
    max_shard_size: str | None = None,
    **overrides,
) -> Path:
    """Save a tiny random model of `family` with `save_pretrained`; returns `path`."""
    import transformers

    spec = dict(FAMILIES[family])
    spec.update(overrides)
    model_type = spec.pop("model_type")
    base = dict(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
    )
    base.update(spec)
    config = transformers.AutoConfig.for_model(model_type, **base)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return path


def _randomize(model) -> None:
    """Non-trivial norms and biases so every weight matters in the comparison."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))


def load_reference(path: Path, dtype: torch.dtype = torch.float32):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
