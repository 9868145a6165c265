"""Property test of the scheduler + KV manager over random arrivals, aborts and finishes.

No model runs: a fake "compute" writes each token id into its cache slot, so a prefix hit
(whole cached blocks, tokens copied from a pinned block, or blocks restored from the disk
spill store) can be checked against the tokens it claims to hold.
"""

from __future__ import annotations

import tempfile
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentcpu.config import SchedulerConfig
from agentcpu.engine.request import Request
from agentcpu.engine.sampling_params import SamplingParams
from agentcpu.engine.scheduler import Scheduler
from agentcpu.engine.step_cost import StepCostModel
from agentcpu.kvcache.manager import KVCacheManager
from agentcpu.kvcache.spill import DiskKVStore

BLOCK = 4
NUM_BLOCKS = 12

prompt = st.lists(st.integers(0, 3), min_size=1, max_size=20)
event = st.one_of(
    st.tuples(st.just("arrive"), prompt, st.integers(1, 8)),
    # an agent's next turn: a finished turn's tokens cut anywhere (a client may send the
    # reply back re-rendered), then new ones, under the same session
    st.tuples(st.just("follow"), st.integers(0, 50), st.integers(0, 40), prompt, st.integers(1, 8)),
    st.tuples(st.just("abort"), st.integers(0, 50)),
    st.tuples(st.just("step"), st.integers(0, 2**16), st.integers(1, 6)),  # noise, steps
)


def _check_invariants(kv: KVCacheManager, scheduler: Scheduler) -> None:
    pool = kv.pool
    held = Counter(b for r in scheduler.running for b in r.block_ids)
    held.update(b for pin in kv.pins.pins.values() for b in pin.all_blocks)
    assert kv.pins.num_pinned_blocks <= kv.pins.budget_blocks
    for r in scheduler.waiting:
        assert not r.block_ids, "a waiting request holds no blocks"
    for block in range(pool.num_blocks):
        assert pool.ref_counts[block] == held[block], f"block {block} refcount"
        assert (block in pool.free_queue) == (held[block] == 0)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(event, min_size=20, max_size=60), st.integers(1, 16), st.integers(0, 8))
@pytest.mark.parametrize("spill", [False, True], ids=["pool-only", "disk-spill"])
def test_no_leak_no_shared_write(spill, events, budget, prefill_cap):
    kv = KVCacheManager(NUM_BLOCKS, BLOCK, pin_budget_blocks=NUM_BLOCKS // 2)
    config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=budget, max_step_ms=500)
    scheduler = Scheduler(config, kv)
    if prefill_cap:  # the step-time cap, as if learned: `prefill_cap` tokens beside decodes
        scheduler.cost = StepCostModel(min_chunk=1, decode_step_s=0.0, prefill_token_s=0.5 / prefill_cap)
    # the "KV" of each slot is the token id computed there (-1: never written), laid out
    # as the engine's pool [layers, k/v, slots, kv heads, head dim] for the spill store
    slot_token = torch.full((1, 1, NUM_BLOCKS * BLOCK, 1, 1), -1, dtype=torch.int64)
    with tempfile.TemporaryDirectory() as spill_dir:
        if spill:  # room for a few blocks only: the store evicts too
            kv.attach_spill(DiskKVStore(slot_token, BLOCK, spill_dir, 3 * NUM_BLOCKS * BLOCK * 8))
        _run_events(kv, scheduler, slot_token, events)


def _run_events(kv, scheduler, slot_token, events):
    live: list[Request] = []
    done: list[Request] = []
    flat = slot_token.view(-1)

    def copy_tokens(source: int, target: int, n: int) -> None:
        assert kv.pool.ref_counts[source] > 0, "copying from a block nobody holds"
        assert kv.pool.ref_counts[target] == 1, "copying into a shared block"
        flat[target * BLOCK : target * BLOCK + n] = flat[source * BLOCK : source * BLOCK + n]

    kv.copy_tokens = copy_tokens
    for i, ev in enumerate(events):
        if ev[0] == "follow" and done:
            _, which, cut, new, max_tokens = ev
            turn = done[which % len(done)]
            past = turn.prompt_token_ids + turn.output_token_ids
            ev = ("arrive", past[: cut % (len(past) + 1)] + new, max_tokens, turn.session_id)
        if ev[0] == "arrive":
            tokens, max_tokens = ev[1], ev[2]
            if kv.blocks_needed(len(tokens) + max_tokens) <= NUM_BLOCKS:
                r = Request(f"r{i}", tokens, SamplingParams(max_tokens=max_tokens))
                session = ev[3] if len(ev) > 3 else f"s{len(tokens) % 3}" if max_tokens % 2 else None
                if session is not None:  # agent turns pin their KV
                    r.session_id, r.pin_ttl_s = session, 60.0
                scheduler.add(r)
                live.append(r)
        elif ev[0] == "abort" and live:
            r = live.pop(ev[1] % len(live))
            scheduler.finish(r, "abort")
        elif ev[0] == "step":
            for k in range(ev[2]):
                _step(kv, scheduler, flat, live, done, ev[1] + k)
        _check_invariants(kv, scheduler)
    # every request admitted can finish: nobody waits forever (for room, for a block)
    for k in range(50 * NUM_BLOCKS * BLOCK):
        if not live:
            break
        _step(kv, scheduler, flat, live, done, k)
        _check_invariants(kv, scheduler)
    assert not live and not scheduler.has_unfinished()
    for session in list(kv.pins.pins):
        kv.pins.unpin(session)
    assert kv.pool.num_free == NUM_BLOCKS
    assert all(c == 0 for c in kv.pool.ref_counts)


def _step(kv, scheduler, flat, live, done, noise):
    for s in scheduler.schedule():
        r = s.request
        # a prefix hit must hold exactly this request's tokens
        for pos in range(r.num_computed_tokens):
            slot = r.block_ids[pos // BLOCK] * BLOCK + pos % BLOCK
            assert flat[slot].item() == r.token(pos), "prefix hit holds other tokens"
        for pos in range(r.num_computed_tokens, r.num_computed_tokens + s.num_new_tokens):
            block = r.block_ids[pos // BLOCK]
            assert kv.pool.ref_counts[block] == 1, "writing into a shared block"
            flat[block * BLOCK + pos % BLOCK] = r.token(pos)
        sampled = s.samples
        r.num_computed_tokens += s.num_new_tokens
        kv.publish_computed(r)
        if sampled:
            r.output_token_ids.append(noise % 4)
            if len(r.output_token_ids) >= r.params.max_tokens:
                scheduler.finish(r, "length")
                live.remove(r)
                done.append(r)
