"""From a model path to a filled model, its tokenizer and a resolved EngineConfig."""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from agentcpu.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from agentcpu.errors import ModelLoadError
from agentcpu.loaders.safetensors_dir import iter_safetensors
from agentcpu.models.loader import build_model, load_weights

log = logging.getLogger(__name__)

DEFAULT_MAX_MODEL_LEN = 32768
GGUF_SUFFIX = ".gguf"


def read_model_config(model: str) -> ModelConfig:
    path = Path(model)
    if not path.exists():
        raise ModelLoadError(f"model path {model} does not exist")
    if _is_gguf_file(path):
        from agentcpu.loaders.gguf_file import GGUFModelFile

        return GGUFModelFile(path).model_config()
    return ModelConfig.from_model_dir(path)


def resolve_engine_config(
    model: str,
    dtype: str = "bfloat16",
    max_model_len: int | None = None,
    kv_cache_gb: float = 1.0,
    block_size: int = 16,
    enable_prefix_caching: bool = True,
    max_num_seqs: int = 64,
    max_num_batched_tokens: int = 1024,
    threads: int = 0,
    quant: str | None = None,
    pin_ttl_s: float = 30.0,
    spill_gb: float = 0.0,
    spill_dir: str | None = None,
) -> EngineConfig:
    """Turn user-facing options (with "auto" = None) into a frozen EngineConfig."""
    model_config = read_model_config(model)
    limit = min(model_config.max_position_embeddings, DEFAULT_MAX_MODEL_LEN)
    if max_model_len is None:
        max_model_len = limit
    elif max_model_len > model_config.max_position_embeddings:
        raise ModelLoadError(
            f"max_model_len {max_model_len} exceeds the model's max_position_embeddings "
            f"{model_config.max_position_embeddings}"
        )
    return EngineConfig(
        model=str(model),
        model_config=model_config,
        dtype=dtype,
        max_model_len=max_model_len,
        threads=threads,
        quant=quant,
        cache=CacheConfig(
            block_size,
            kv_cache_gb,
            enable_prefix_caching,
            pin_ttl_s=pin_ttl_s,
            spill_gb=spill_gb,
            spill_dir=spill_dir,
        ),
        scheduler=SchedulerConfig(max_num_seqs, max_num_batched_tokens),
    )


def load_model_and_tokenizer(config: EngineConfig) -> tuple[nn.Module, object | None]:
    """The filled model and the tokenizer (None when the directory has no tokenizer)."""
    from agentcpu.quant import apply_quant

    if _is_gguf_file(config.model):
        model, tokenizer = _load_gguf(config)
    else:
        model = build_model(config.model_config, config.dtype, config.max_model_len)
        load_weights(model, iter_safetensors(config.model))
        tokenizer = load_tokenizer(config.model)
    return apply_quant(model, config.quant), tokenizer


def _is_gguf_file(model: str | Path) -> bool:
    """A single-file GGUF checkpoint (llama.cpp's format) rather than an HF directory."""
    path = Path(model)
    return path.suffix.lower() == GGUF_SUFFIX and path.is_file()


def _load_gguf(config: EngineConfig) -> tuple[nn.Module, object | None]:
    from agentcpu.loaders.gguf_file import GGUFModelFile
    from agentcpu.loaders.gguf_tensors import iter_hf_tensors
    from agentcpu.loaders.gguf_tokenizer import tokenizer_from_gguf
    from agentcpu.models.loader import DTYPES

    gguf = GGUFModelFile(config.model)
    model = build_model(config.model_config, config.dtype, config.max_model_len)
    load_weights(model, iter_hf_tensors(gguf, config.model_config, DTYPES[config.dtype]))
    return model, tokenizer_from_gguf(gguf)


def load_tokenizer(model: str):
    if not (Path(model) / "tokenizer.json").is_file():
        log.warning("%s has no tokenizer.json: only token-id prompts are accepted", model)
        return None
    from agentcpu.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(model)
