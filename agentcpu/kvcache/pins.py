"""Session pins: a session waiting on a tool keeps its KV blocks.

When a turn ends (typically in tool calls), the session's computed full blocks are
pinned: the pin holds one reference on each block, so neither LRU eviction nor another
request can take them. The turn's last, partly filled block (its "tail") is pinned too,
with the tokens the pin covers: a history rarely ends on a block boundary, and the next
turn copies the KV of the tokens it shares with a pinned block instead of recomputing
them (`KVCacheManager.match_prefix`). A pin ends when the session returns (its next
request takes its own references via the prefix cache, then the old pin is dropped), when its time-to-live
passes, when the session is deleted, or under memory pressure (oldest first) — a pin
never makes a running request fail. Pinned blocks are bounded by `budget_blocks`,
counted once however many sessions pin them (agents sharing a system prompt pin the same
prefix blocks).
"""

from __future__ import annotations

import time
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

from agentcpu.kvcache.block_pool import BlockPool

MAX_TRACKED_SESSIONS = 10_000  # session records kept for GET /v1/sessions/{id}


@dataclass
class Pin:
    session_id: str
    blocks: list[int]  # full, published blocks, in sequence order
    pinned_at: float
    expires_at: float
    num_tokens: int
    tail_block: int | None = None  # the partly filled block after `blocks`
    tokens: array = field(default_factory=lambda: array("i"))  # the tokens whose KV is held

    @property
    def all_blocks(self) -> list[int]:
        return self.blocks if self.tail_block is None else [*self.blocks, self.tail_block]

    def block_at(self, index: int) -> int | None:
        """The pinned block holding tokens [index * block_size, ...), full or tail."""
        blocks = self.all_blocks
        return blocks[index] if index < len(blocks) else None


@dataclass
class SessionInfo:
    """What a session has used: turns pinned, when it was last active, tokens cached."""

    turns: int = 0
    last_activity: float = 0.0
    cached_tokens_saved: int = 0


@dataclass
class PinStats:
    pinned: int = 0
    released_ttl: int = 0
    released_pressure: int = 0
    released_budget: int = 0
    resumed: int = 0


class SessionPins:
    def __init__(self, pool: BlockPool, block_size: int, budget_blocks: int, clock=time.monotonic):
        self.on_expire = None  # called with each pin whose TTL passed, before its release
        self.pool = pool
        self.block_size = block_size
        self.budget_blocks = budget_blocks
        self.clock = clock
        self.pins: OrderedDict[str, Pin] = OrderedDict()  # oldest first
        self.sessions: OrderedDict[str, SessionInfo] = OrderedDict()  # bounded, LRU
        self.max_sessions = MAX_TRACKED_SESSIONS
        self._pin_counts: dict[int, int] = {}  # block id -> pins holding it
        self._pinner: dict[int, str] = {}  # block id -> the session that pinned it last
        self.stats = PinStats()

    @property
    def num_pinned_blocks(self) -> int:
        """Distinct blocks held by at least one pin."""
        return len(self._pin_counts)

    def _new_blocks(self, blocks: list[int]) -> int:
        return sum(1 for b in set(blocks) if b not in self._pin_counts)

    def pin(
        self,
        session_id: str,
        blocks: list[int],
        ttl_s: float,
        tail_block: int | None = None,
        tokens: list[int] | None = None,
    ) -> Pin | None:
        """Pin `blocks` (computed, full, published) and the partly filled `tail_block`
        after them for `session_id`, replacing its old pin. `tokens` are the tokens whose
        KV these blocks hold (what a partial match compares against)."""
        self.unpin(session_id)
        self._touch(session_id).turns += 1
        held = blocks if tail_block is None else [*blocks, tail_block]
        if not held or ttl_s <= 0 or len(held) > self.budget_blocks:
            return None
        while self.num_pinned_blocks + self._new_blocks(held) > self.budget_blocks and self.pins:
            self._release_oldest()
            self.stats.released_budget += 1
        self.pool.reference(held)
        for b in held:
            self._pin_counts[b] = self._pin_counts.get(b, 0) + 1
            self._pinner[b] = session_id
        now = self.clock()
        num_tokens = len(tokens) if tokens is not None else len(blocks) * self.block_size
        pin = Pin(session_id, list(blocks), now, now + ttl_s, num_tokens, tail_block, array("i", tokens or ()))
        self.pins[session_id] = pin
        self.stats.pinned += 1
        return pin

    def pin_continuing(self, hits: list[int], session_id: str | None) -> Pin | None:
        """A pin whose blocks begin with `hits` (a request's prefix hit), preferring the
        request's own session: its next block may share the request's next tokens."""
        candidates = [session_id] if session_id is not None else []
        if hits:
            candidates.append(self._pinner.get(hits[-1]))
        for candidate in candidates:
            pin = self.pins.get(candidate)
            if pin is not None and pin.blocks[: len(hits)] == hits:
                return pin
        return None

    def resumed(self, session_id: str, cached_tokens: int) -> None:
        """The session's next turn started with `cached_tokens` served from cache."""
        self._touch(session_id).cached_tokens_saved += cached_tokens

    def forget(self, session_id: str) -> bool:
        """End a session: release its pin and drop its record. False if unknown."""
        pinned = self.unpin(session_id) is not None
        return self.sessions.pop(session_id, None) is not None or pinned

    def _touch(self, session_id: str) -> SessionInfo:
        info = self.sessions.pop(session_id, None) or SessionInfo()
        info.last_activity = time.time()
        self.sessions[session_id] = info
        while len(self.sessions) > self.max_sessions:
            self.sessions.popitem(last=False)
        return info

    def unpin(self, session_id: str) -> Pin | None:
        pin = self.pins.pop(session_id, None)
        if pin is not None:
            held = pin.all_blocks
            self.pool.release(reversed(held))
            for b in held:
                left = self._pin_counts[b] - 1
                if left:
                    self._pin_counts[b] = left
                else:
                    del self._pin_counts[b]
                    del self._pinner[b]
        return pin

    def expire(self) -> int:
        """Release pins whose TTL has passed; returns how many."""
        now, n = self.clock(), 0
        for session_id in [s for s, p in self.pins.items() if p.expires_at <= now]:
            if self.on_expire is not None:
                self.on_expire(self.pins[session_id])
            self.unpin(session_id)
            n += 1
        self.stats.released_ttl += n
        return n

    def relieve_pressure(self) -> bool:
        """Release the oldest pin to make room; False when nothing is pinned."""
        if not self.pins:
            return False
        self._release_oldest()
        self.stats.released_pressure += 1
        return True

    def _release_oldest(self) -> None:
        self.unpin(next(iter(self.pins)))
