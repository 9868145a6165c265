"""Attention over the paged KV cache for a packed batch of sequences.

The runner packs every scheduled token of every sequence into one [T, ...] batch: the
decoding sequences first (one query token each), then prefill chunks. `AttentionMetadata`
tells this layer where each token's K/V goes in the cache (`slot_mapping`) and which
cache slots each sequence attends to. It is built once per step and shared by all layers.

Cache layout per layer: k and v of shape [num_slots, num_kv_heads, head_dim], where a
slot is `block_id * block_size + offset`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType

import torch
import torch.nn.functional as F

from agentcpu.layers.fused_ops import (
    DECODE_MAX_GROUP,
    PREFILL_HEAD_DIMS,
    decode_attention_kernel,
    fused_for,
    prefill_attention_kernel,
)


@dataclass
class PrefillChunk:
    """One sequence's chunk of new tokens [start, start + length) in the packed batch."""

    start: int
    length: int
    context_len: int  # tokens attended to by the chunk's last token, chunk included
    context_slots: torch.Tensor | None  # [context_len] cache slots; None if no earlier context
    mask: torch.Tensor | None = None  # offset causal mask, built by the first layer, reused


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot of each new token
    num_decode: int = 0
    decode_slots: torch.Tensor | None = None  # [num_decode, max_context] (padded)
    # [num_decode, 1, 1, max_context] True = attend; built by the first layer that runs
    # SDPA (the compiled kernels read decode_lens instead) and shared by the others
    decode_mask: torch.Tensor | None = None
    decode_lens: torch.Tensor | None = None  # [num_decode] int64 context length
    prefills: list[PrefillChunk] = field(default_factory=list)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q [T, H, D], k/v [T, KVH, D] -> attention output [T, H, D]; writes k/v to the cache."""
    if k.dtype == k_cache.dtype and (ops := fused_for(k)) is not None:
        ops.kv_write(k_cache, v_cache, meta.slot_mapping, k, v)
    else:
        k_cache.index_copy_(0, meta.slot_mapping, k)
        v_cache.index_copy_(0, meta.slot_mapping, v)
    if meta.num_decode == q.shape[0] and not meta.prefills:  # a pure decode step: no copy
        return _decode(q, k_cache, v_cache, meta, scale)
    out = torch.empty_like(q)
    if meta.num_decode:
        out[: meta.num_decode] = _decode(q[: meta.num_decode], k_cache, v_cache, meta, scale)
    for chunk in meta.prefills:
        end = chunk.start + chunk.length
        if (kernel := _prefill_kernel(q, k_cache)) is not None:
            slots = chunk.context_slots
            slots = meta.slot_mapping[chunk.start : end] if slots is None else slots
            out[chunk.start : end] = kernel.prefill_attention(
                q[chunk.start : end], k_cache, v_cache, slots, scale
            )
        else:
            out[chunk.start : end] = _prefill(
                q[chunk.start : end], k, v, k_cache, v_cache, chunk, scale
            )
    return out


def decode_attention_op(
    dtype: torch.dtype, heads: int, head_dim: int, k_cache: torch.Tensor
) -> tuple[ModuleType, str] | None:
    """(extension, op name) of the compiled decode attention for this model's queries
    over `k_cache`, both taking (q, k_cache, v_cache, slots, lens, scale); None where
    PyTorch's SDPA runs. The VDPBF16PS kernel where it applies (bf16 on AVX-512 BF16,
    head_dim a multiple of 32, at most 8 query heads per KV head: 1.15-1.55x the AVX2
    kernel on Zen 4, session 25), else the fused AVX2 one. The decode stack (`models/decode_stack.py`) asks too."""
    if k_cache.dtype != dtype:
        return None
    bf16_ok = dtype == torch.bfloat16 and head_dim % 32 == 0
    if bf16_ok and heads // k_cache.shape[1] <= DECODE_MAX_GROUP:
        if (kernel := decode_attention_kernel()) is not None:
            return kernel, "decode_attention_bf16"
    if (ops := fused_for(k_cache)) is not None:
        return ops, "decode_attention"
    return None


def _prefill_kernel(q: torch.Tensor, k_cache: torch.Tensor):
    """The compiled chunk-over-context attention where it applies (bf16 on AVX-512 BF16,
    head_dim 64 or 128): 2-3x PyTorch's SDPA at agent shapes (docs/kernels.md)."""
    if q.dtype != torch.bfloat16 or k_cache.dtype != torch.bfloat16:
        return None
    if q.shape[-1] not in PREFILL_HEAD_DIMS:
        return None
    return prefill_attention_kernel()


def _decode(q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    op = decode_attention_op(q.dtype, q.shape[1], q.shape[-1], k_cache)
    if meta.decode_lens is not None and op is not None:
        module, name = op
        return getattr(module, name)(q, k_cache, v_cache, meta.decode_slots, meta.decode_lens, scale)
    keys = k_cache[meta.decode_slots].transpose(1, 2)  # [B, KVH, L, D]
    values = v_cache[meta.decode_slots].transpose(1, 2)
    if meta.decode_mask is None:
        attend = torch.arange(meta.decode_slots.shape[1])[None, :] < meta.decode_lens[:, None]
        meta.decode_mask = attend[:, None, None, :]
    out = _sdpa(q.unsqueeze(2), keys, values, meta.decode_mask, False, scale)  # [B, H, 1, D]
    return out.squeeze(2)


def _prefill(q, k, v, k_cache, v_cache, chunk: PrefillChunk, scale: float) -> torch.Tensor:
    if chunk.context_slots is None:
        end = chunk.start + chunk.length
        keys, values, mask, causal = k[chunk.start : end], v[chunk.start : end], None, True
    else:
        keys, values = k_cache[chunk.context_slots], v_cache[chunk.context_slots]
        if chunk.mask is None:  # same for every layer: ~0.5 ms each at 300 x 2,300
            chunk.mask = _offset_causal_mask(chunk.length, chunk.context_len, q.device)
        mask, causal = chunk.mask, False
    out = _sdpa(
        q.transpose(0, 1).unsqueeze(0),
        keys.transpose(0, 1).unsqueeze(0),
        values.transpose(0, 1).unsqueeze(0),
        mask,
        causal,
        scale,
    )
    return out.squeeze(0).transpose(0, 1)


def _offset_causal_mask(q_len: int, kv_len: int, device) -> torch.Tensor:
    """Query i (at absolute position kv_len - q_len + i) sees keys 0..that position."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    return torch.arange(kv_len, device=device)[None, :] <= q_pos


def _sdpa(q, k, v, mask, causal: bool, scale: float) -> torch.Tensor:
    """GQA by `enable_gqa` rather than `repeat_interleave`: the same result without a
    group-size copy of the context's K/V (a 300-token chunk over 2,300 cached tokens,
    Qwen2.5-0.5B heads, 1 thread: 62 -> 55 ms bf16, 56 -> 46 ms fp32 per layer)."""
    gqa = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa
    )
