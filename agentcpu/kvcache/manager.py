"""Request-level KV bookkeeping on top of `BlockPool`: prefix matching, slot allocation,
publishing computed blocks, freeing. Holds block ids only, never tensors (copying a
partial match is a callback into the engine's KV pool, `copy_tokens`).

Prefix matching is by whole blocks (chain hashes), then by tokens for one more block: an
agent's next turn diverges from its last one mid-block (where the previous prompt or
generated text ends, or where the chat template renders the assistant message back
differently from how it was generated), and on a 16-token block that tail is often as
long as the new tool result. A session pin keeps the blocks and tokens of the turn, so
the shared leading tokens of the first block that differs are copied from the pin into
the request's own new block (a copy, never a shared block: nothing is written while
shared) instead of being recomputed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from agentcpu.engine.request import Request
from agentcpu.kvcache.block_pool import NO_PARENT, BlockPool, chain_hash
from agentcpu.kvcache.pins import SessionPins


@dataclass
class PrefixHit:
    """What a new request finds computed: cached whole blocks, then the first
    `copy_tokens` tokens of one more block, to copy from pinned block `copy_from`."""

    blocks: list[int] = field(default_factory=list)
    copy_from: int | None = None
    copy_tokens: int = 0
    block_size: int = 0
    # the request's stored KV run did not fit beside the running requests: admitting it
    # now would recompute what the disk holds, so it waits for them to free blocks
    waits_for_room: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.blocks) * self.block_size + self.copy_tokens


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
        # copy_tokens(src_block, dst_block, n): copy the KV of a block's first n slots;
        # set by the engine, which owns the tensors (None: whole-block matching only)
        self.copy_tokens: Callable[[int, int, int], None] | None = None

    def attach_spill(self, store) -> None:
        """Spill to `store` the KV of expired session pins and of every cached block the
        pool evicts, and restore from it on prefix match.

        Spilling on eviction covers what pins alone miss: pins released under memory
        pressure and plain prefix-cache entries (a client sending no session id). Writing
        a block costs ~0.2 ms against the ~100 ms its 16 tokens took to prefill on 2
        cores (docs/kv-spill.md), so it is done even for blocks never read again."""
        self.spill = store
        self.pins.on_expire = self._spill_pin
        self.pool.on_evict = store.spill

    def _spill_pin(self, pin) -> None:
        for block in pin.blocks:
            block_hash = self.pool.block_hash[block]
            if block_hash is not None:
                self.spill.spill(block, block_hash)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, request: Request, can_wait: bool = False) -> PrefixHit:
        """Cached blocks covering the request's longest known prefix, then the tokens of
        the next block that a session pin already holds.

        Blocks of that prefix on the disk spill store are restored first. If they do not
        fit with the request's other blocks and `can_wait` (running requests will free
        blocks), nothing is restored and the hit says `waits_for_room`.

        At least one token is always left to compute, so the last forward yields logits.
        """
        self._extend_hashes(request, request.num_tokens - 1)
        hashes = request.block_hashes
        hits = self.pool.lookup(hashes)
        if self.spill is not None and len(hits) < len(hashes) and hashes[len(hits)] in self.spill:
            prompt_blocks = self.blocks_needed(request.num_tokens)
            if not self._restore_from_disk(hashes, prompt_blocks, can_wait):
                return PrefixHit(block_size=self.block_size, waits_for_room=True)
            hits = self.pool.lookup(hashes)
        hit = PrefixHit(hits, block_size=self.block_size)
        if self.copy_tokens is not None:
            self._match_pinned_tokens(request, hit)
        return hit

    def _match_pinned_tokens(self, request: Request, hit: PrefixHit) -> None:
        pin = self.pins.pin_continuing(hit.blocks, request.session_id)
        if pin is None:
            return
        index = len(hit.blocks)
        source = pin.block_at(index)
        start = index * self.block_size
        end = min(start + self.block_size, request.num_tokens - 1, len(pin.tokens))
        if source is None or end <= start:
            return
        n = 0
        for ours, theirs in zip(request.tokens(start, end), pin.tokens[start:end], strict=True):
            if ours != theirs:
                break
            n += 1
        if n:
            hit.copy_from, hit.copy_tokens = source, n

    def _restore_from_disk(self, hashes: list[int], prompt_blocks: int, can_wait: bool) -> bool:
        """Bring back the stored blocks of the prefix `hashes` (a chain whose blocks may
        sit in the pool or on disk, in any mix); they become cached blocks. False when
        they should wait: the run does not fit beside the prompt's other blocks and
        `can_wait`.

        The chain's blocks still in the pool are held while restoring, so that restoring
        never evicts the prefix it extends (a request re-admitted each step would
        otherwise trade its own blocks back and forth with the disk). Pins give way to
        make room, as in `allocate` (reading a block back is ~1,000x cheaper than the
        prefill it saves, docs/kv-spill.md). With nothing running to wait for, the
        leading stored blocks that fit are restored and the rest is recomputed."""
        chain: list[int | None] = []  # pool block, or None for a stored one
        for h in hashes:
            block = self.pool.cached.get(h)
            if block is None and h not in self.spill:
                break
            chain.append(block)
        missing = [i for i, block in enumerate(chain) if block is None]
        if len(missing) < self.min_restore_blocks:
            return True
        held = [block for block in chain if block is not None]
        self.pool.reference(held)
        try:
            other = max(0, prompt_blocks - len(chain))  # blocks the tokens after the run need
            while len(missing) + other > self.pool.num_free and self.pins.relieve_pressure():
                pass
            room = self.pool.num_free - other
            if room < len(missing) and can_wait:
                return False
            self._restore_blocks([hashes[i] for i in missing[: max(0, room)]])
        finally:
            self.pool.release(reversed(held))
        return True

    def _restore_blocks(self, stored: list[int]) -> None:
        """Read `stored` hashes into fresh blocks, in chain order, stopping at the first
        that fails (what follows a gap in the chain is unreachable by lookup)."""
        if not stored:
            return
        blocks = self.pool.allocate(len(stored))
        for block, h in zip(blocks, stored, strict=True):
            if not self.spill.restore(h, block):
                break
            self.pool.register(block, h)
        self.pool.release(reversed(blocks))

    def allocate(self, request: Request, num_new_tokens: int, hit: PrefixHit | None = None) -> bool:
        """Give `request` blocks for `num_new_tokens` more tokens after its computed ones
        (and after `hit`, a new request's prefix hit from `match_prefix`, whose partial
        block is copied into the request's first new block). False if the pool is short."""
        hit = hit if hit is not None else PrefixHit(block_size=self.block_size)
        hits, source = hit.blocks, hit.copy_from if hit.copy_tokens else None
        if source is not None:
            self.pool.reference([source])  # alive even if its pin gives way below
        try:
            while True:
                computed = request.num_computed_tokens + hit.num_tokens
                needed = self.blocks_needed(computed + num_new_tokens) - len(request.block_ids) - len(hits)
                if needed + self.pool.count_evictable(hits) <= self.pool.num_free:
                    break
                if self.pins.relieve_pressure():  # pins give way before anyone waits
                    continue
                if source is None:
                    return False
                # the copy's source is the block we lack: recompute those tokens instead
                self.pool.release([source])
                source, hit.copy_from, hit.copy_tokens = None, None, 0
            if hits:
                self.pool.reference(hits)
                request.block_ids.extend(hits)
            request.num_computed_tokens = computed
            if needed > 0:
                new_blocks = self.pool.allocate(needed)
                if source is not None:
                    self.copy_tokens(source, new_blocks[0], hit.copy_tokens)
                request.block_ids.extend(new_blocks)
        finally:
            if source is not None:
                self.pool.release([source])
        if request.session_id is not None and request.session_id in self.pins.pins:
            self.pins.unpin(request.session_id)  # the session is back: its request holds them
            self.pins.stats.resumed += 1
            self.pins.resumed(request.session_id, hit.num_tokens)
        return True

    def pin_session(self, request: Request, ttl_s: float) -> None:
        """Keep the request's computed full blocks for its session after it finishes."""
        if request.session_id is None:
            return
        self.publish_computed(request)
        full, computed = request.num_published_blocks, request.num_computed_tokens
        tail = request.block_ids[full] if computed > full * self.block_size else None
        tokens = request.tokens(0, computed)
        self.pins.pin(request.session_id, request.block_ids[:full], ttl_s, tail, tokens)

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
