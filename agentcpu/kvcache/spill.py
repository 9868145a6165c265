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

import logging
import os
import shutil
import tempfile
import weakref
from collections import OrderedDict
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# `--kv-spill-gb auto`: this share of the free space where the store lives, at most
# DEFAULT_MAX_GB; nothing on a RAM-backed filesystem (spilling there moves KV out of the
# budgeted pool into unbudgeted memory)
DEFAULT_SHARE_OF_FREE = 0.1
DEFAULT_MAX_GB = 4.0
RAM_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})


def default_spill_gb(directory: str | None) -> float:
    """The disk budget `auto` gives the store in `directory` (default: the temp dir)."""
    where = Path(directory or tempfile.gettempdir())
    while not where.exists() and where != where.parent:
        where = where.parent
    if _filesystem_type(where) in RAM_FILESYSTEMS:
        return 0.0
    free_gb = shutil.disk_usage(where).free / (1 << 30)
    return round(min(DEFAULT_MAX_GB, DEFAULT_SHARE_OF_FREE * free_gb), 3)


def _filesystem_type(path: Path) -> str | None:
    """The type of the filesystem mounted deepest above `path` (Linux), else None."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    resolved, best, kind = str(path.resolve()), "", None
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = resolved == point or resolved.startswith(point.rstrip("/") + "/")
        if inside and len(point) > len(best):
            best, kind = point, fields[2]
    return kind


class DiskKVStore:
    def __init__(
        self, kv_pool: torch.Tensor, block_size: int, directory: str | None, max_bytes: int
    ):
        # kv_pool: [layers, 2, slots, kv_heads, head_dim]
        self.kv_pool = kv_pool
        self.block_size = block_size
        self.directory = Path(directory or tempfile.mkdtemp(prefix="agentcpu-kv-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.block_bytes = kv_pool[:, :, :block_size].numel() * kv_pool.element_size()
        self.index: OrderedDict[int, Path] = OrderedDict()  # chain hash -> file, LRU order
        # the files are keyed by this process's hashes, useless to any other: remove them
        # when the store goes (garbage collection or interpreter exit), and the directory
        # too when it was made here
        self._cleanup = weakref.finalize(
            self, _remove_files, self.index, None if directory else self.directory
        )
        self.spilled_blocks = 0
        self.restored_blocks = 0
        self.failed_writes = 0

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
        try:
            data.view(torch.uint8).numpy().tofile(tmp)
            os.replace(tmp, path)
        except OSError as exc:  # disk full or gone: the block is just not kept
            tmp.unlink(missing_ok=True)
            self.failed_writes += 1
            if self.failed_writes == 1:
                log.warning(
                    "KV spill to %s failed (%s); blocks that fail are recomputed",
                    self.directory,
                    exc,
                )
            return
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
        _remove_files(self.index, None)

    def _slots(self, block: int) -> slice:
        return slice(block * self.block_size, (block + 1) * self.block_size)


def _remove_files(index: OrderedDict[int, Path], directory: Path | None) -> None:
    for path in index.values():
        path.unlink(missing_ok=True)
    index.clear()
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)
