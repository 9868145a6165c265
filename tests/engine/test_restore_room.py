"""Restoring a prefix from the disk spill store when the pool is nearly full.

The pressure case of the agent benchmark: a session's first blocks are still cached in
the pool (evictable), its later ones were evicted to disk, and running requests hold most
of the pool. No model runs: each slot's "KV" is the token id computed there, so a
restored or cached block can be checked against the tokens it claims to hold.
"""

from __future__ import annotations

import pytest
import torch

from agentcpu.config import SchedulerConfig
from agentcpu.engine.request import Request
from agentcpu.engine.sampling_params import SamplingParams
from agentcpu.engine.scheduler import Scheduler
from agentcpu.kvcache.manager import KVCacheManager
from agentcpu.kvcache.spill import DiskKVStore

BLOCK = 4
NUM_BLOCKS = 12
CHAIN = list(range(100, 140))  # 10 full blocks: a session's history
FOLLOW_UP = CHAIN + [7, 8]  # its next turn: 2 new tokens, 11 blocks in all


@pytest.fixture
def kv(tmp_path):
    slots = torch.full((1, 1, NUM_BLOCKS * BLOCK, 1, 1), -1, dtype=torch.int64)
    kv = KVCacheManager(NUM_BLOCKS, BLOCK, pin_budget_blocks=NUM_BLOCKS // 2)
    kv.attach_spill(DiskKVStore(slots, BLOCK, str(tmp_path), 1 << 20))
    kv.slots = slots.view(-1)
    return kv


def _compute(kv, request: Request, n: int) -> None:
    """What a forward does to the cache: write the tokens, publish the full blocks."""
    for pos in range(request.num_computed_tokens, request.num_computed_tokens + n):
        kv.slots[request.block_ids[pos // BLOCK] * BLOCK + pos % BLOCK] = request.token(pos)
    request.num_computed_tokens += n
    kv.publish_computed(request)


def _request(name: str, tokens: list[int]) -> Request:
    return Request(name, tokens, SamplingParams(max_tokens=1))


def _hold(kv, name: str, num_blocks: int) -> Request:
    """A running request holding `num_blocks` new blocks (evicting the oldest cached)."""
    r = _request(name, [1] * (num_blocks * BLOCK - 1))
    assert kv.allocate(r, r.num_tokens)
    return r


def _history_half_on_disk(kv) -> Request:
    """The chain computed and freed, then its last 5 blocks evicted to disk by a request
    that keeps holding them; the first 5 stay cached at the front of the free queue."""
    first = _request("turn-1", CHAIN)
    assert kv.allocate(first, len(CHAIN))
    _compute(kv, first, len(CHAIN))
    kv.free(first)  # free queue: the 2 never-used blocks, then the chain tail first
    holder = _hold(kv, "holder", 7)  # the 2 free blocks and the chain's last 5
    assert kv.spill.spilled_blocks == 5 and kv.pool.num_free == 5
    return holder


def _assert_holds_its_tokens(kv, request: Request, hit) -> None:
    for pos in range(hit.num_tokens):
        assert kv.slots[hit.blocks[pos // BLOCK] * BLOCK + pos % BLOCK] == request.token(pos)


def test_restoring_never_evicts_the_prefix_it_extends(kv):
    """The 5 free blocks are the chain's own cached head: restoring the tail into them
    would evict the head (and the next try would restore the head over the tail)."""
    _history_half_on_disk(kv)
    follow_up = _request("turn-2", FOLLOW_UP)
    hit = kv.match_prefix(follow_up, can_wait=False)
    assert len(hit.blocks) == 5 and kv.spill.restored_blocks == 0
    _assert_holds_its_tokens(kv, follow_up, hit)


def test_a_run_that_does_not_fit_waits_while_others_run(kv):
    holder = _history_half_on_disk(kv)
    follow_up = _request("turn-2", FOLLOW_UP)
    assert kv.match_prefix(follow_up, can_wait=True).waits_for_room
    assert kv.spill.restored_blocks == 0
    kv.free(holder)  # the running request finishes: now the whole run fits
    hit = kv.match_prefix(follow_up, can_wait=True)
    assert not hit.waits_for_room and len(hit.blocks) == 10
    assert kv.spill.restored_blocks == 5
    _assert_holds_its_tokens(kv, follow_up, hit)
    assert kv.allocate(follow_up, len(FOLLOW_UP) - hit.num_tokens, hit)


def test_with_nothing_to_wait_for_the_leading_blocks_that_fit_are_restored(kv):
    first = _request("turn-1", CHAIN)
    assert kv.allocate(first, len(CHAIN))
    _compute(kv, first, len(CHAIN))
    kv.free(first)
    spare = _hold(kv, "spare", 2)  # the 2 never-used blocks
    _hold(kv, "holder", 5)  # evicts the chain's last 5 to disk
    kv.free(spare)  # 2 truly free blocks, then the chain's cached head
    follow_up = _request("turn-2", FOLLOW_UP)
    hit = kv.match_prefix(follow_up, can_wait=False)
    # room for 2 blocks, 1 of them kept for the 2 new tokens: 1 block restored
    assert len(hit.blocks) == 6 and kv.spill.restored_blocks == 1
    _assert_holds_its_tokens(kv, follow_up, hit)
    assert kv.allocate(follow_up, BLOCK, hit)  # a first chunk still fits


def test_scheduler_admits_the_waiting_session_once_the_run_fits(kv):
    """End to end through the scheduler: the follow-up is held back (not admitted to
    recompute 20 tokens) while another request runs, then computes only its new ones."""
    first = _request("turn-1", CHAIN)
    assert kv.allocate(first, len(CHAIN))
    _compute(kv, first, len(CHAIN))
    kv.free(first)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), kv)
    other = _request("other", [1] * 26)  # 7 blocks: the 2 free and the chain's last 5
    other.params = SamplingParams(max_tokens=2)
    scheduler.add(other)
    (step,) = scheduler.schedule()
    _compute(kv, other, step.num_new_tokens)
    other.output_token_ids.append(0)
    follow_up = _request("turn-2", FOLLOW_UP)
    scheduler.add(follow_up)
    scheduled = scheduler.schedule()  # other decodes; the follow-up would not fit restored
    assert [s.request.request_id for s in scheduled] == ["other"]
    assert follow_up in scheduler.waiting and not follow_up.block_ids
    _compute(kv, other, 1)
    scheduler.finish(other, "length")
    (step,) = scheduler.schedule()
    assert step.request is follow_up and follow_up.num_cached_tokens == len(CHAIN)
    assert step.num_new_tokens == 2
