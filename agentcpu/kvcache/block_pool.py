"""Fixed-size KV blocks with reference counts and a hash-chained prefix cache.

A block holding a full run of `block_size` tokens is identified by the hash of its
tokens chained with its parent block's hash, so equal hashes mean equal prefixes (the
radix tree of DESIGN.md, flattened to one dict). A block whose reference count drops to
zero stays in the cache and goes to the back of the free queue; allocation takes blocks
from the front, so the least recently freed cached prefix is evicted first. `on_evict`
(the disk spill store, when there is one) sees each cached block just before its slots
are reused.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

from agentcpu.errors import CapacityError

NO_PARENT = 0


def chain_hash(parent: int, tokens: Sequence[int]) -> int:
    """Identity of a full block: its tokens plus everything before it."""
    return hash((parent, tuple(tokens)))


class BlockPool:
    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise CapacityError("the KV cache holds no block: raise kv_cache_gb")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # chain hash -> block id
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        # on_evict(block, chain_hash): a cached block is about to be overwritten
        self.on_evict: Callable[[int, int], None] | None = None

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_queue)

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free_queue):
            raise CapacityError(f"asked for {n} KV blocks, {len(self.free_queue)} free")
        blocks = []
        for _ in range(n):
            block, _ = self.free_queue.popitem(last=False)
            evicted = self.block_hash[block]
            if evicted is not None and self.on_evict is not None:
                self.on_evict(block, evicted)
            self._uncache(block)
            self.ref_counts[block] = 1
            blocks.append(block)
        return blocks

    def lookup(self, hashes: Iterable[int]) -> list[int]:
        """The blocks caching the longest prefix of `hashes` (not yet referenced)."""
        hits = []
        if not self.enable_prefix_caching:
            return hits
        for h in hashes:
            block = self.cached.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def reference(self, blocks: Iterable[int]) -> None:
        """Take a reference on cached blocks (a prefix hit); they leave the free queue."""
        for block in blocks:
            if self.ref_counts[block] == 0:
                del self.free_queue[block]
            self.ref_counts[block] += 1

    def release(self, blocks: Iterable[int]) -> None:
        """Drop one reference on each block; pass a sequence's blocks tail first so its
        tail is evicted before its head."""
        for block in blocks:
            self.ref_counts[block] -= 1
            if self.ref_counts[block] < 0:
                raise RuntimeError(f"KV block {block} released more often than referenced")
            if self.ref_counts[block] == 0:
                if self.block_hash[block] is None:
                    self.free_queue[block] = None
                    self.free_queue.move_to_end(block, last=False)
                else:
                    self.free_queue[block] = None

    def register(self, block: int, block_hash: int) -> None:
        """Publish a full, computed block under its chain hash (first writer wins)."""
        if self.enable_prefix_caching and block_hash not in self.cached:
            self.cached[block_hash] = block
            self.block_hash[block] = block_hash

    def count_evictable(self, blocks: Iterable[int]) -> int:
        """How many of `blocks` currently sit in the free queue (a hit on them uses one)."""
        return sum(1 for b in blocks if self.ref_counts[b] == 0)

    def _uncache(self, block: int) -> None:
        h = self.block_hash[block]
        if h is not None:
            del self.cached[h]
            self.block_hash[block] = None
