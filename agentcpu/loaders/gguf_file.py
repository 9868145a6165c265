"""A GGUF file (llama.cpp's single-file checkpoint) as a model source.

`GGUFModelFile(path)` opens the file (memory-mapped, header parsed by `gguf_header`)
and exposes its metadata; `model_config()` turns that metadata into a `ModelConfig`,
as `config.json` would.
The tensors are read by `gguf_tensors`, the tokenizer by `gguf_tokenizer`.

    gguf = GGUFModelFile("model.gguf")
    cfg = gguf.model_config()
    load_weights(model, iter_hf_tensors(gguf, cfg, torch.bfloat16))
    tokenizer = tokenizer_from_gguf(gguf)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from gguf import Keys

from agentcpu.config import ModelConfig
from agentcpu.errors import ModelLoadError, UnsupportedModelError
from agentcpu.layers.rope import rope_inv_freq
from agentcpu.loaders.gguf_header import GGUFFormatError, TensorInfo, read_header

# general.architecture -> Hugging Face model_type. Mistral GGUFs say "llama".
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
DEFAULT_ROPE_THETA = 10000.0
DEFAULT_RMS_NORM_EPS = 1e-5
DEFAULT_CONTEXT_LENGTH = 4096
ROPE_FREQS_TENSOR = "rope_freqs.weight"
LEGACY_ROPE_SCALE_LINEAR = "{arch}.rope.scale_linear"  # older files; gguf.Keys dropped it
# How closely the llama3 rope parameters rebuilt from `rope_freqs` must reproduce it.
ROPE_FREQS_RTOL = 1e-4
F32_DIGITS = 7  # significant decimal digits a float32 holds
FITTED_DIGITS = 6  # of values fitted to float32 data (rope_freqs)


class GGUFModelFile:
    """One opened GGUF file: typed metadata lookups and its tensor table.

    Opening parses the header only; tensor data stays memory-mapped until it is used.
    A missing, truncated or corrupt file raises `ModelLoadError`.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelLoadError(f"GGUF file {self.path} does not exist")
        try:
            header = read_header(self.path)
        except (GGUFFormatError, OSError) as e:
            raise ModelLoadError(f"cannot read GGUF file {self.path}: {e}") from None
        self.metadata: dict[str, Any] = header.metadata
        self.tensors: dict[str, TensorInfo] = header.tensors

    # -- metadata ---------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        """The value of a metadata key (str, number, bool or list), or `default`."""
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ModelLoadError(f"GGUF file {self.path} lacks the metadata key {key!r}")
        return value

    @property
    def architecture(self) -> str:
        """general.architecture, checked to be one agentcpu implements."""
        arch = self.require(Keys.General.ARCHITECTURE)
        if arch not in ARCHITECTURES:
            raise UnsupportedModelError(
                f"GGUF architecture {arch!r} is not supported "
                f"(supported: {', '.join(sorted(ARCHITECTURES))})"
            )
        return arch

    def arch_key(self, template: str) -> str:
        """A `{arch}.`-templated gguf.Keys name for this file's architecture."""
        return template.format(arch=self.architecture)

    def tensor_rows(self, name: str) -> int | None:
        """The leading (Hugging Face order) dimension of a tensor, or None if absent."""
        tensor = self.tensors.get(name)
        return None if tensor is None else tensor.shape[0]

    # -- config -----------------------------------------------------------------

    def model_config(self) -> ModelConfig:
        """The decoder's shape and numerics, as `config.json` would state them."""
        try:
            hf_config = self.hf_config()
        except (TypeError, ValueError) as e:  # a number stored as a string, a list, ...
            raise ModelLoadError(f"GGUF file {self.path} has malformed metadata: {e}") from None
        return ModelConfig.from_hf_dict(hf_config)

    def hf_config(self) -> dict[str, Any]:
        """The metadata rewritten as a Hugging Face `config.json` dict."""
        arch, key = self.architecture, self.arch_key
        num_heads = _per_layer_constant(self.require(key(Keys.Attention.HEAD_COUNT)), "head_count")
        num_kv_heads = _per_layer_constant(
            self.get(key(Keys.Attention.HEAD_COUNT_KV), num_heads), "head_count_kv"
        )
        hidden = int(self.require(key(Keys.LLM.EMBEDDING_LENGTH)))
        head_dim = int(self.get(key(Keys.Attention.KEY_LENGTH)) or hidden // num_heads)
        self._check_full_rotary(head_dim)
        return {
            "model_type": ARCHITECTURES[arch],
            "vocab_size": self._vocab_size(),
            "hidden_size": hidden,
            "num_hidden_layers": int(self.require(key(Keys.LLM.BLOCK_COUNT))),
            "num_attention_heads": num_heads,
            "num_key_value_heads": num_kv_heads,
            "head_dim": head_dim,
            "intermediate_size": _per_layer_constant(
                self.require(key(Keys.LLM.FEED_FORWARD_LENGTH)), "feed_forward_length"
            ),
            "rms_norm_eps": _f32_value(
                self.get(key(Keys.Attention.LAYERNORM_RMS_EPS), DEFAULT_RMS_NORM_EPS)
            ),
            "rope_theta": _f32_value(self.get(key(Keys.Rope.FREQ_BASE), DEFAULT_ROPE_THETA)),
            "max_position_embeddings": int(
                self.get(key(Keys.LLM.CONTEXT_LENGTH), DEFAULT_CONTEXT_LENGTH)
            ),
            "tie_word_embeddings": "output.weight" not in self.tensors,
            "attention_bias": "blk.0.attn_q.bias" in self.tensors,
            "rope_scaling": self._rope_scaling(head_dim),
        }

    def _vocab_size(self) -> int:
        rows = self.tensor_rows("token_embd.weight")
        if rows is None:
            raise ModelLoadError(f"GGUF file {self.path} has no token_embd.weight tensor")
        return rows

    def _check_full_rotary(self, head_dim: int) -> None:
        rope_dim = self.get(self.arch_key(Keys.Rope.DIMENSION_COUNT))
        if rope_dim is not None and int(rope_dim) != head_dim:
            raise UnsupportedModelError(
                f"partial rotary embeddings (rope dimension {rope_dim} of head size "
                f"{head_dim}) are not supported"
            )

    def _rope_scaling(self, head_dim: int) -> dict[str, Any] | None:
        if ROPE_FREQS_TENSOR in self.tensors:
            factors = np.asarray(self.tensors[ROPE_FREQS_TENSOR].data, dtype=np.float64)
            base = _f32_value(self.get(self.arch_key(Keys.Rope.FREQ_BASE), DEFAULT_ROPE_THETA))
            return llama3_scaling_from_factors(factors.reshape(-1), head_dim, base)
        key = self.arch_key
        rope_type = self.get(key(Keys.Rope.SCALING_TYPE))
        factor = self.get(key(Keys.Rope.SCALING_FACTOR)) or self.get(key(LEGACY_ROPE_SCALE_LINEAR))
        if rope_type is None and factor is not None:
            rope_type = "linear"
        if rope_type in (None, "none") or not factor or float(factor) == 1.0:
            return None
        if rope_type == "linear":
            return {"rope_type": "linear", "factor": _f32_value(factor)}
        if rope_type == "yarn":
            return self._yarn_scaling(_f32_value(factor))
        raise UnsupportedModelError(f"GGUF rope scaling type {rope_type!r} is not supported")

    def _yarn_scaling(self, factor: float) -> dict[str, Any]:
        key = self.arch_key
        scaling: dict[str, Any] = {"rope_type": "yarn", "factor": factor}
        optional = {
            "original_max_position_embeddings": Keys.Rope.SCALING_ORIG_CTX_LEN,
            "attention_factor": Keys.Rope.SCALING_YARN_ATTN_FACTOR,
            "beta_fast": Keys.Rope.SCALING_YARN_BETA_FAST,
            "beta_slow": Keys.Rope.SCALING_YARN_BETA_SLOW,
        }
        for hf_name, gguf_key in optional.items():
            value = self.get(key(gguf_key))
            if value is not None:
                scaling[hf_name] = value if isinstance(value, int) else _f32_value(value)
        return scaling


def _f32_value(value: Any) -> float:
    """A float32 metadata value as the decimal it was written from (1e-06, not
    9.99999997e-07), so configs compare equal to the Hugging Face ones."""
    return _significant(value, F32_DIGITS)


def _significant(value: Any, digits: int) -> float:
    return float(f"{float(value):.{digits}g}")


def _per_layer_constant(value: Any, name: str) -> int:
    """Some files store a per-layer list; agentcpu needs every layer alike."""
    if isinstance(value, list):
        if not value or len(set(value)) != 1:
            raise UnsupportedModelError(f"GGUF {name} differs between layers: {value}")
        value = value[0]
    return int(value)


def llama3_scaling_from_factors(
    factors: np.ndarray, head_dim: int, base: float
) -> dict[str, Any] | None:
    """Hugging Face `rope_scaling` (type llama3) that reproduces llama.cpp's `rope_freqs`.

    The converter bakes llama3 scaling into per-frequency divisors: 1 for high
    frequencies, `factor` for low ones, a smooth blend between. The blend is linear in
    1 / wavelength between the two cut-off wavelengths, which we fit; only their ratio to
    `original_max_position_embeddings` matters, so low_freq_factor is fixed at 1.
    """
    if factors.shape != (head_dim // 2,):
        raise ModelLoadError(
            f"rope_freqs has {factors.size} entries, expected head_dim / 2 = {head_dim // 2}"
        )
    factor = _f32_value(factors.max())
    if np.allclose(factors, 1.0):
        return None
    inv_freq = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    x = inv_freq / (2 * math.pi)  # 1 / wavelength
    is_high = np.isclose(factors, 1.0, rtol=ROPE_FREQS_RTOL)
    is_low = np.isclose(factors, factor, rtol=ROPE_FREQS_RTOL)
    is_mid = ~is_high & ~is_low
    smooth = (1 / factors[is_mid] - 1 / factor) / (1 - 1 / factor)
    x_low, x_high = _llama3_cutoffs(x, is_high, is_low, x[is_mid], smooth)
    low_wavelen, high_wavelen = 1 / x_low, 1 / x_high
    original = _significant(low_wavelen, FITTED_DIGITS)
    original = int(original) if original.is_integer() else original
    scaling = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": _significant(original / high_wavelen, FITTED_DIGITS),
        "original_max_position_embeddings": original,
    }
    rebuilt, _ = rope_inv_freq(head_dim, base, scaling, 0)
    expected = inv_freq / factors
    if not np.allclose(rebuilt.double().numpy(), expected, rtol=ROPE_FREQS_RTOL):
        raise UnsupportedModelError(
            "the GGUF's rope_freqs factors are not a llama3 rope scaling agentcpu can express"
        )
    return scaling


def _llama3_cutoffs(
    x: np.ndarray, is_high: np.ndarray, is_low: np.ndarray, x_mid: np.ndarray, smooth: np.ndarray
) -> tuple[float, float]:
    """(1 / low_freq_wavelen, 1 / high_freq_wavelen) consistent with every frequency."""
    lowest_high = float(x[is_high].min()) if is_high.any() else 2 * float(x.max())
    highest_low = float(x[is_low].max()) if is_low.any() else 0.5 * float(x.min())
    if x_mid.size >= 2:  # smooth = (x - x_low) / (x_high - x_low): a line through the points
        slope, intercept = np.polyfit(x_mid, smooth, 1)
        return -intercept / slope, (1 - intercept) / slope
    if x_mid.size == 1:
        x_high = (float(x_mid[0]) + lowest_high) / 2
        s = float(smooth[0])
        return (float(x_mid[0]) - s * x_high) / (1 - s), x_high
    gap = lowest_high - highest_low
    return highest_low + gap / 3, highest_low + 2 * gap / 3
