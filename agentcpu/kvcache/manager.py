"""Request-level KV bookkeeping on top of `BlockPool`: prefix matching, slot allocation,
publishing computed blocks, freeing. Holds block ids only, never tensors."""

from __future__ import annotations

from agentcpu.engine.request import Request
from agentcpu.kvcache.block_pool import NO_PARENT, BlockPool, chain_hash
from agentcpu.kvcache.pins import SessionPins


class KVCacheManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        pin_budget_blocks: int | None = None,
    ):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        budget = num_blocks // 2 if pin_budget_blocks is None else pin_budget_blocks
        self.pins = SessionPins(self.pool, block_size, budget)
        self.spill = None  # a DiskKVStore when idle sessions spill to disk
        self.min_restore_blocks = 1  # below this, recomputing beats reading (docs/kv-spill.md)

    def attach_spill(self, store) -> None:
        """Spill expired session pins to `store` and restore from it on prefix match."""
        self.spill = store
        self.pins.on_expire = self._spill_pin

    def _spill_pin(self, pin) -> None:
        for block in pin.blocks:
            block_hash = self.pool.block_hash[block]
            if block_hash is not None:
                self.spill.spill(block, block_hash)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, request: Request) -> list[int]:
        """Cached blocks covering the request's longest known prefix.

        At least one token is always left to compute, so the last forward yields logits.
        """
        self._extend_hashes(request, request.num_tokens - 1)
        hits = self.pool.lookup(request.block_hashes)
        if self.spill is not None and self._restore_from_disk(request.block_hashes[len(hits) :]):
            hits = self.pool.lookup(request.block_hashes)
        return hits

    def _restore_from_disk(self, hashes: list[int]) -> int:
        """Bring back the stored blocks continuing a prefix; they become cached blocks."""
        stored = []
        for h in hashes:
            if h not in self.spill:
                break
            stored.append(h)
        if len(stored) < self.min_restore_blocks or len(stored) > self.pool.num_free:
            return 0
        blocks = self.pool.allocate(len(stored))
        restored = 0
        for block, h in zip(blocks, stored, strict=True):
            if not self.spill.restore(h, block):
                break
            self.pool.register(block, h)
            restored += 1
        self.pool.release(reversed(blocks))
        return restored

    def allocate(self, request: Request, num_new_tokens: int, hits: list[int] = ()) -> bool:
        """Give `request` blocks for `num_new_tokens` more tokens after its computed ones
        (and after `hits`, a prefix hit from `match_prefix`). False if the pool is short."""
        computed = request.num_computed_tokens + len(hits) * self.block_size
        needed = self.blocks_needed(computed + num_new_tokens) - len(request.block_ids) - len(hits)
        while needed + self.pool.count_evictable(hits) > self.pool.num_free:
            if not self.pins.relieve_pressure():  # pins give way before anyone waits
                return False
        if hits:
            self.pool.reference(hits)
            request.block_ids.extend(hits)
            request.num_computed_tokens = computed
        if needed > 0:
            request.block_ids.extend(self.pool.allocate(needed))
        if request.session_id is not None and request.session_id in self.pins.pins:
            self.pins.unpin(request.session_id)  # the session is back: its request holds them
            self.pins.stats.resumed += 1
            self.pins.resumed(request.session_id, len(hits) * self.block_size)
        return True

    def pin_session(self, request: Request, ttl_s: float) -> None:
        """Keep the request's computed full blocks for its session after it finishes."""
        if request.session_id is None:
            return
        self.publish_computed(request)
        self.pins.pin(request.session_id, request.block_ids[: request.num_published_blocks], ttl_s)

    def publish_computed(self, request: Request) -> None:
        """Register every full block whose KV is now computed in the prefix cache."""
        num_full = request.num_computed_tokens // self.block_size
        self._extend_hashes(request, num_full * self.block_size)
        for i in range(request.num_published_blocks, num_full):
            self.pool.register(request.block_ids[i], request.block_hashes[i])
        request.num_published_blocks = max(request.num_published_blocks, num_full)

    def free(self, request: Request) -> None:
        self.pool.release(reversed(request.block_ids))
        request.block_ids = []
        request.num_published_blocks = 0

    def _extend_hashes(self, request: Request, num_tokens: int) -> None:
        bs = self.block_size
        for i in range(len(request.block_hashes), num_tokens // bs):
            parent = request.block_hashes[i - 1] if i else NO_PARENT
            request.block_hashes.append(chain_hash(parent, request.tokens(i * bs, (i + 1) * bs)))
