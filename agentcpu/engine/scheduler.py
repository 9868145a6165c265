"""Each step: which requests advance, and by how many tokens.

Decodes (running requests one token from the end) go first, so a stream never waits
behind someone else's prompt; then unfinished prefill chunks of running requests, then
waiting requests are admitted while the token budget, the sequence limit and the KV pool
allow. While any decode is in the step, prefill tokens are also capped so the step stays
near `max_step_ms` (`StepCostModel` learns the cost of a token online): this bounds the
gap between two tokens of a stream, which a token budget alone does not on a slow CPU.

A decode that cannot get a block preempts the most recently admitted request (its
blocks are freed; it is recomputed later, mostly from the prefix cache). A prefill
chunk that cannot get a block preempts a later request not in this step, or waits for
the next step. A waiting request whose next uncached block a running prefill is
computing waits for it to be published instead of computing it again. Integers and
block ids only.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from agentcpu.config import SchedulerConfig
from agentcpu.engine.request import Request, RequestStatus
from agentcpu.engine.step_cost import StepCostModel
from agentcpu.kvcache.manager import KVCacheManager, PrefixHit


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
        self.cost = StepCostModel()

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledRequest]:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        budget = self._schedule_decodes(scheduled, budget)
        prefill_budget = budget
        if scheduled and self.config.max_step_ms > 0:
            cap = self.cost.prefill_budget(self.config.max_step_ms / 1000)
            if cap is not None:
                prefill_budget = min(budget, cap)
        prefill_budget = self._schedule_prefill_chunks(scheduled, prefill_budget)
        self._admit_waiting(scheduled, prefill_budget)
        return scheduled

    def _schedule_decodes(self, scheduled: list[ScheduledRequest], budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            if request.num_tokens - request.num_computed_tokens != 1:
                i += 1
                continue
            while not self.kv.allocate(request, 1):
                victim = self.running.pop()  # index >= i: not scheduled yet
                self._preempt(victim)
                if victim is request:
                    break
            else:
                scheduled.append(ScheduledRequest(request, 1))
                budget -= 1
                i += 1
        return budget

    def _schedule_prefill_chunks(self, scheduled: list[ScheduledRequest], budget: int) -> int:
        in_step = {id(s.request) for s in scheduled}
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            if id(request) in in_step:
                i += 1
                continue
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.kv.allocate(request, n):
                victim = self._prefill_victim(after=i, in_step=in_step)
                if victim is None:
                    if scheduled:  # the step's other requests will free or preempt
                        return 0
                    victim = request
                self.running.remove(victim)
                self._preempt(victim)
                if victim is request:
                    break
            else:
                scheduled.append(ScheduledRequest(request, n))
                in_step.add(id(request))
                budget -= n
                i += 1
        return budget

    def _prefill_victim(self, after: int, in_step: set[int]) -> Request | None:
        """The most recently admitted running request after index `after` that is not
        in this step (preempting a scheduled one would unschedule it)."""
        for request in reversed(self.running[after + 1:]):
            if id(request) not in in_step:
                return request
        return None

    def _admit_waiting(self, scheduled: list[ScheduledRequest], budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            hit = self.kv.match_prefix(request, can_wait=bool(self.running))
            if hit.waits_for_room or self._next_block_in_flight(request, hit):
                break
            n = min(request.num_tokens - hit.num_tokens, budget)
            if not self.kv.allocate(request, n, hit):
                break
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = hit.num_tokens
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(ScheduledRequest(request, n))
            budget -= n

    def _next_block_in_flight(self, request: Request, hit: PrefixHit) -> bool:
        """Whether the first block past the request's cached prefix is one a running
        prefill is computing (same chain hash: same tokens from the start). Then the
        request waits: the block is published when computed, and admitting it now would
        compute the shared prefix a second time (a burst of requests on one system
        prompt otherwise computes it up to once per chunk in flight)."""
        hashes, cached = request.block_hashes, len(hit.blocks)
        if not self.kv.pool.enable_prefix_caching or hit.copy_tokens or cached >= len(hashes):
            return False
        wanted = hashes[cached]
        for other in self.running:
            if other.num_tokens - other.num_computed_tokens > 1:  # still prefilling
                if wanted in other.block_hashes[other.num_published_blocks :]:
                    return True
        return False

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
