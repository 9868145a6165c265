"""Rotary position embeddings (non-interleaved "rotate half", as HF Llama checkpoints).

The inverse frequencies follow transformers' ROPE_INIT_FUNCTIONS for the rope types we
support; cos/sin are precomputed once for every position up to max_model_len and
gathered per token, so the hot path does no trigonometry.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from agentcpu.layers.fast_module import FastModule
from agentcpu.layers.fused_ops import fused_for


def _default_inv_freq(dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    factor = scaling["factor"]
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_len / low_freq_factor
    high_freq_wavelen = old_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(
    dim: int, base: float, scaling: dict[str, Any], max_pos: int
) -> tuple[torch.Tensor, float]:
    factor = scaling["factor"]
    original = scaling.get("original_max_position_embeddings") or max_pos
    attention_factor = scaling.get("attention_factor")
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation_factor = 1 - ramp
    inv_freq = (1 / (factor * pos_freqs)) * (1 - extrapolation_factor) + (
        1 / pos_freqs
    ) * extrapolation_factor
    return inv_freq, attention_factor


def rope_inv_freq(
    dim: int, base: float, scaling: dict[str, Any] | None, max_pos: int
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the attention scaling factor for a rope config."""
    rope_type = (scaling or {}).get("rope_type", "default")
    inv_freq = _default_inv_freq(dim, base)
    if rope_type == "linear":
        return inv_freq / scaling["factor"], 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(dim, base, scaling, max_pos)
    return inv_freq, 1.0


class RotaryEmbedding(FastModule):
    """Applies rope to q [T, H, D] and k [T, KVH, D] at integer positions [T]."""

    def __init__(self, head_dim: int, base: float, scaling: dict[str, Any] | None, max_pos: int):
        super().__init__()
        self.head_dim, self.base, self.scaling, self.max_pos = head_dim, base, scaling, max_pos
        self.register_buffer("cos_sin", torch.empty(0), persistent=False)

    def build(self, max_len: int, dtype: torch.dtype) -> None:
        """Precompute cos/sin for positions [0, max_len) in fp32, stored in `dtype`."""
        inv_freq, attention_factor = rope_inv_freq(
            self.head_dim, self.base, self.scaling, self.max_pos
        )
        positions = torch.arange(max_len, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * attention_factor, emb.sin() * attention_factor
        self.cos_sin = torch.stack((cos, sin)).to(dtype)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated (q, k); the compiled op rotates them in place (they are fresh views of
        the step's qkv projection) where it handles the dtype."""
        if q.dtype == self.cos_sin.dtype == k.dtype and (ops := fused_for(q)) is not None:
            ops.rope_inplace(q, k, self.cos_sin, positions)
            return q, k
        cos = self.cos_sin[0, positions].unsqueeze(1)
        sin = self.cos_sin[1, positions].unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
