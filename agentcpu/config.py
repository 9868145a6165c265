"""Frozen configuration passed down the engine.

`ModelConfig` is parsed once from a checkpoint's `config.json` (or GGUF metadata);
"auto" values are resolved before the frozen objects are built, so nothing downstream
re-derives them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentcpu.errors import InvalidRequestError, ModelLoadError, UnsupportedModelError

# model_type -> the decoder traits that differ inside the Llama family.
FAMILY_TRAITS: dict[str, dict[str, bool]] = {
    "llama": {"qkv_bias": False, "qk_norm": False},
    "mistral": {"qkv_bias": False, "qk_norm": False},
    "qwen2": {"qkv_bias": True, "qk_norm": False},
    "qwen3": {"qkv_bias": False, "qk_norm": True},
}

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "dynamic", "yarn")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    qk_norm: bool = False
    rope_scaling: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope_scaling type {rope_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> ModelConfig:
        model_type = hf.get("model_type")
        if model_type not in FAMILY_TRAITS:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported "
                f"(supported: {', '.join(sorted(FAMILY_TRAITS))})"
            )
        try:
            num_heads = int(hf["num_attention_heads"])
            hidden = int(hf["hidden_size"])
            head_dim = hf.get("head_dim") or hidden // num_heads
            traits = FAMILY_TRAITS[model_type]
            qkv_bias = bool(hf.get("attention_bias", traits["qkv_bias"]))
            return cls(
                model_type=model_type,
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
                head_dim=int(head_dim),
                intermediate_size=int(hf["intermediate_size"]),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=float(_rope_theta(hf)),
                max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                qkv_bias=traits["qkv_bias"] or qkv_bias,
                qk_norm=traits["qk_norm"],
                rope_scaling=_rope_scaling(hf),
            )
        except KeyError as e:
            raise ModelLoadError(f"config.json is missing the field {e.args[0]!r}") from None

    @classmethod
    def from_model_dir(cls, path: str | Path) -> ModelConfig:
        config_path = Path(path) / "config.json"
        if not config_path.is_file():
            raise ModelLoadError(f"{config_path} not found: a model directory needs config.json")
        try:
            return cls.from_hf_dict(json.loads(config_path.read_text()))
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{config_path} is not valid JSON: {e}") from None


def _rope_theta(hf: dict[str, Any]) -> float:
    params = hf.get("rope_parameters") or {}
    return hf.get("rope_theta") or params.get("rope_theta") or 10000.0


def _rope_scaling(hf: dict[str, Any]) -> dict[str, Any] | None:
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters")
    if not scaling:
        return None
    scaling = dict(scaling)
    scaling["rope_type"] = scaling.get("rope_type") or scaling.get("type") or "default"
    if scaling["rope_type"] == "default":
        return None
    return scaling


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: fixed-size blocks from one preallocated pool."""

    block_size: int = 16
    kv_cache_gb: float = 1.0
    enable_prefix_caching: bool = True
    pin_ttl_s: float = 30.0  # how long a session's KV is kept after a turn
    pin_budget_fraction: float = 0.5  # share of the pool that pins may hold
    spill_gb: float = 0.0  # disk budget for evicted KV blocks and expired pins (0: off)
    spill_dir: str | None = None  # default: a fresh temporary directory

    def __post_init__(self) -> None:
        if not 0 <= self.pin_budget_fraction <= 1:
            raise InvalidRequestError("pin_budget_fraction must be in [0, 1]")
        if self.block_size < 1:
            raise InvalidRequestError(f"block_size must be >= 1, got {self.block_size}")
        if self.kv_cache_gb <= 0:
            raise InvalidRequestError(f"kv_cache_gb must be > 0, got {self.kv_cache_gb}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Per-step limits: how many sequences and tokens one forward may carry."""

    max_num_seqs: int = 64
    # 512: on a CPU a step of 512 prompt tokens is already one efficient GEMM per layer
    # (2,048-token prompts prefill at the same rate in 512 chunks), and the prompts
    # queued in a step all get their first token when it ends: on the 16-session agent
    # workload 1,024 -> 512 cut TTFT p50 22.4 -> 13.3 s at the same wall time
    # (docs/architecture.md). llama.cpp's default micro-batch is 512 too.
    max_num_batched_tokens: int = 512
    # while streams decode, cap a step's prefill tokens to about this wall time (0: off;
    # off by default: it costs agent workloads ~12 % wall time, see docs/architecture.md)
    max_step_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise InvalidRequestError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.max_step_ms < 0:
            raise InvalidRequestError(f"max_step_ms must be >= 0, got {self.max_step_ms}")


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs, resolved (no "auto" left)."""

    model: str
    model_config: ModelConfig
    dtype: str = "bfloat16"
    max_model_len: int = 4096
    threads: int = 0
    quant: str | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        if self.dtype not in ("bfloat16", "float32"):
            raise InvalidRequestError(f"dtype must be bfloat16 or float32, got {self.dtype!r}")
        if self.max_model_len < 2:
            raise InvalidRequestError(f"max_model_len must be >= 2, got {self.max_model_len}")
