"""Each step: which requests advance, and by how many tokens.

Running requests go first (decodes and unfinished prefill chunks), then waiting ones are
admitted while the token budget, the sequence limit and the KV pool allow. A running
request that cannot get a block preempts the most recently admitted one (its blocks are
freed; it is recomputed later, mostly from the prefix cache). Integers and block ids only.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from agentcpu.config import SchedulerConfig
from agentcpu.engine.request import Request, RequestStatus
from agentcpu.kvcache.manager import KVCacheManager


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the known tokens (so a token is sampled)."""
        r = self.request
        return r.num_computed_tokens + self.num_new_tokens == r.num_tokens


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledRequest]:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        budget = self._schedule_running(scheduled, budget)
        self._admit_waiting(scheduled, budget)
        return scheduled

    def _schedule_running(self, scheduled: list[ScheduledRequest], budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.kv.allocate(request, n):
                victim = self.running.pop()
                self._preempt(victim)
                if victim is request:
                    break
            else:
                scheduled.append(ScheduledRequest(request, n))
                budget -= n
                i += 1
        return budget

    def _admit_waiting(self, scheduled: list[ScheduledRequest], budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            hits = self.kv.match_prefix(request)
            remaining = request.num_tokens - len(hits) * self.kv.block_size
            n = min(remaining, budget, self._chunk_limit())
            if not self.kv.allocate(request, n, hits):
                break
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = len(hits) * self.kv.block_size
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(ScheduledRequest(request, n))
            budget -= n

    def _chunk_limit(self) -> int:
        return self.config.max_num_batched_tokens

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)

    def finish(self, request: Request, reason: str) -> None:
        """Remove a request wherever it is and free its blocks (idempotent). A finished
        (not aborted) turn of a session pins its KV first."""
        if request.finished:
            return
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        if reason != "abort" and request.pin_ttl_s > 0:
            self.kv.pin_session(request, request.pin_ttl_s)
        self.kv.free(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
