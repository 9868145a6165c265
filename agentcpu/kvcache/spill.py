"""Idle sessions spill to disk: the KV of an expired pin is written out block by block
and read back when a request's prefix continues into it.

Blocks are keyed by their chain hash (so a restored block is exactly the prefix it was),
one file per block, raw bytes of the block's slots in every layer. The store is bounded
in bytes and evicts least recently used files. Restoring is a copy into freshly allocated
blocks that are then published in the prefix cache like any computed block.

Why: on a CPU, re-prefilling a 2,000-token history costs seconds; reading its ~25 MB of
KV back costs tens of milliseconds (measured crossover: see docs/kv-spill.md).
"""

from __future__ import annotations

import os
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch


class DiskKVStore:
    def __init__(self, kv_pool: torch.Tensor, block_size: int, directory: str | None, max_bytes: int):
        # kv_pool: [layers, 2, slots, kv_heads, head_dim]
        self.kv_pool = kv_pool
        self.block_size = block_size
        self.directory = Path(directory or tempfile.mkdtemp(prefix="agentcpu-kv-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.block_bytes = kv_pool[:, :, :block_size].numel() * kv_pool.element_size()
        self.index: OrderedDict[int, Path] = OrderedDict()  # chain hash -> file, LRU order
        self.spilled_blocks = 0
        self.restored_blocks = 0

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self.index

    @property
    def num_bytes(self) -> int:
        return len(self.index) * self.block_bytes

    def spill(self, block: int, block_hash: int) -> None:
        """Write a computed block under its chain hash (no-op if already stored)."""
        if block_hash in self.index:
            self.index.move_to_end(block_hash)
            return
        if self.block_bytes > self.max_bytes:
            return
        while self.num_bytes + self.block_bytes > self.max_bytes:
            _, old = self.index.popitem(last=False)
            old.unlink(missing_ok=True)
        path = self.directory / f"{block_hash & 0xFFFFFFFFFFFFFFFF:016x}.kv"
        data = self.kv_pool[:, :, self._slots(block)].contiguous()
        tmp = path.with_suffix(".tmp")
        data.view(torch.uint8).numpy().tofile(tmp)
        os.replace(tmp, path)
        self.index[block_hash] = path
        self.spilled_blocks += 1

    def restore(self, block_hash: int, block: int) -> bool:
        """Read a stored block into `block`'s slots; False if missing or unreadable."""
        path = self.index.get(block_hash)
        if path is None:
            return False
        try:
            raw = torch.from_file(str(path), size=self.block_bytes, dtype=torch.uint8)
        except (OSError, RuntimeError):
            del self.index[block_hash]
            return False
        shape = self.kv_pool[:, :, : self.block_size].shape
        self.kv_pool[:, :, self._slots(block)] = raw.view(self.kv_pool.dtype).view(shape)
        self.index.move_to_end(block_hash)
        self.restored_blocks += 1
        return True

    def clear(self) -> None:
        for path in self.index.values():
            path.unlink(missing_ok=True)
        self.index.clear()

    def _slots(self, block: int) -> slice:
        return slice(block * self.block_size, (block + 1) * self.block_size)
