"""The KV tensors: one preallocated pool, sized from a byte budget."""

from __future__ import annotations

import torch

from agentcpu.config import CacheConfig, ModelConfig
from agentcpu.errors import CapacityError
from agentcpu.hardware import huge_pages

GIB = 1 << 30


def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * elem


def num_blocks_for_budget(cfg: ModelConfig, cache: CacheConfig, dtype: torch.dtype) -> int:
    n = int(cache.kv_cache_gb * GIB) // bytes_per_block(cfg, cache.block_size, dtype)
    if n < 1:
        raise CapacityError(
            f"kv_cache_gb={cache.kv_cache_gb} holds no KV block of "
            f"{bytes_per_block(cfg, cache.block_size, dtype)} bytes"
        )
    return n


def allocate_kv_pool(
    cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """[layers, 2 (k, v), num_blocks * block_size, num_kv_heads, head_dim].

    Zero-filled (anonymous pages: mapped on first write) so padding slots read in a
    batched gather are finite; in huge pages where the kernel offers them, since decode
    attention streams it (hardware/huge_pages.py).
    """
    slots = num_blocks * block_size
    return huge_pages.zeros((cfg.num_layers, 2, slots, cfg.num_kv_heads, cfg.head_dim), dtype)


def layer_views(pool: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (k, v) views of the pool, each [slots, num_kv_heads, head_dim]."""
    return [(pool[i, 0], pool[i, 1]) for i in range(pool.shape[0])]
