"""The registry of model families: architecture name -> model class, imported lazily."""

from __future__ import annotations

import importlib

from torch import nn

from agentcpu.config import ModelConfig
from agentcpu.errors import UnsupportedModelError

# model_type -> "module:Class"; the one module-level registry in the package.
MODEL_REGISTRY: dict[str, str] = {
    "llama": "agentcpu.models.llama:LlamaForCausalLM",
    "mistral": "agentcpu.models.llama:LlamaForCausalLM",
    "qwen2": "agentcpu.models.llama:LlamaForCausalLM",
    "qwen3": "agentcpu.models.llama:LlamaForCausalLM",
}


def model_class(cfg: ModelConfig) -> type[nn.Module]:
    target = MODEL_REGISTRY.get(cfg.model_type)
    if target is None:
        raise UnsupportedModelError(
            f"model_type {cfg.model_type!r} is not supported "
            f"(supported: {', '.join(sorted(MODEL_REGISTRY))})"
        )
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)
