"""Session pins: a session waiting on a tool keeps its KV blocks.

When a turn ends (typically in tool calls), the session's computed full blocks are
pinned: the pin holds one reference on each block, so neither LRU eviction nor another
request can take them. A pin ends when the session returns (its next request takes its
own references via the prefix cache, then the old pin is dropped), when its time-to-live
passes, when the session is deleted, or under memory pressure (oldest first) — a pin
never makes a running request fail. Pinned blocks are bounded by `budget_blocks`,
counted once however many sessions pin them (agents sharing a system prompt pin the same
prefix blocks).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

from agentcpu.kvcache.block_pool import BlockPool

MAX_TRACKED_SESSIONS = 10_000  # session records kept for GET /v1/sessions/{id}


@dataclass
class Pin:
    session_id: str
    blocks: list[int]
    pinned_at: float
    expires_at: float
    num_tokens: int


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
        self.stats = PinStats()

    @property
    def num_pinned_blocks(self) -> int:
        """Distinct blocks held by at least one pin."""
        return len(self._pin_counts)

    def _new_blocks(self, blocks: list[int]) -> int:
        return sum(1 for b in set(blocks) if b not in self._pin_counts)

    def pin(self, session_id: str, blocks: list[int], ttl_s: float) -> Pin | None:
        """Pin `blocks` (computed, full, published) for `session_id`, replacing its old pin."""
        self.unpin(session_id)
        self._touch(session_id).turns += 1
        if not blocks or ttl_s <= 0 or len(blocks) > self.budget_blocks:
            return None
        while self.num_pinned_blocks + self._new_blocks(blocks) > self.budget_blocks and self.pins:
            self._release_oldest()
            self.stats.released_budget += 1
        self.pool.reference(blocks)
        for b in blocks:
            self._pin_counts[b] = self._pin_counts.get(b, 0) + 1
        now = self.clock()
        pin = Pin(session_id, list(blocks), now, now + ttl_s, len(blocks) * self.block_size)
        self.pins[session_id] = pin
        self.stats.pinned += 1
        return pin

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
            self.pool.release(reversed(pin.blocks))
            for b in pin.blocks:
                left = self._pin_counts[b] - 1
                if left:
                    self._pin_counts[b] = left
                else:
                    del self._pin_counts[b]
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
