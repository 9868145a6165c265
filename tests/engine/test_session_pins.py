"""Sessions keep their KV through tool pauses; pins give way under pressure."""

from __future__ import annotations

import pytest

from tests.engine.helpers import greedy, make_engine, random_prompts

TURN_TOKENS = 40  # tool result appended per turn
REPLY = 8


@pytest.fixture(scope="module")
def path(checkpoint_dir):
    return checkpoint_dir("llama", max_position_embeddings=1024)


def _run_one(engine, prompt, session=None, ttl=None):
    req = engine.add_request(prompt, greedy(REPLY), session_id=session, pin_ttl_s=ttl)
    before = engine.stats.computed_tokens
    out = None
    while engine.has_unfinished():
        for o in engine.step():
            if o.request_id == req.request_id and o.finished:
                out = o
    return out.token_ids, req, engine.stats.computed_tokens - before


def test_six_turn_session_computes_only_new_tokens(path):
    engine = make_engine(path, max_model_len=1024, kv_cache_gb=0.02)
    history = random_prompts(1, [300], seed=1)[0]
    for turn in range(6):
        output, req, computed = _run_one(engine, history, session="s1", ttl=60)
        if turn:
            # only the new tokens are computed: the tool result and the last reply token
            # (sampled, never fed back); the partly filled last block is copied, not redone
            assert len(history) - req.num_cached_tokens == TURN_TOKENS + 1
            assert computed == TURN_TOKENS + 1 + REPLY - 1
        history = history + output + random_prompts(1, [TURN_TOKENS], seed=10 + turn)[0]
    assert engine.kv.pins.stats.resumed == 5


def test_pin_survives_burst_and_gives_way_under_pressure(path):
    engine = _tight_engine(path, 44)
    total = engine.kv.pool.num_blocks
    assert total == 44
    session_prompt = random_prompts(1, [200], seed=3)[0]
    _run_one(engine, session_prompt, session="agent", ttl=60)
    pinned = engine.kv.pins.pins["agent"].blocks
    assert len(pinned) == 12
    # a burst of unrelated traffic that fits beside the pin: the pin survives
    for i in range(4):
        _run_one(engine, random_prompts(1, [150], seed=100 + i)[0])
    assert "agent" in engine.kv.pins.pins
    back, req, _ = _run_one(engine, session_prompt, session="agent", ttl=60)
    assert req.num_cached_tokens == 199  # 12 blocks + 7 tokens of the pinned tail; 1 to compute
    # traffic that needs the whole pool: the pin is released, nobody fails
    big = random_prompts(1, [total * 16 - 40], seed=7)[0]
    out, req, _ = _run_one(engine, big)
    assert len(out) == REPLY
    assert "agent" not in engine.kv.pins.pins
    assert engine.kv.pins.stats.released_pressure == 1


def test_pins_expire_and_end_session(path):
    engine = make_engine(path, max_model_len=1024, kv_cache_gb=0.02)
    clock = [0.0]
    engine.kv.pins.clock = lambda: clock[0]
    _run_one(engine, random_prompts(1, [64], seed=4)[0], session="a", ttl=5)
    _run_one(engine, random_prompts(1, [64], seed=5)[0], session="b", ttl=50)
    assert engine.kv.pins.num_pinned_blocks == 10  # 71 computed tokens each: 4 full blocks + a tail
    clock[0] = 10
    engine.kv.pins.expire()
    assert set(engine.kv.pins.pins) == {"b"}
    assert engine.end_session("b") and not engine.end_session("b")
    assert engine.kv.pins.num_pinned_blocks == 0
    assert all(c == 0 for c in engine.kv.pool.ref_counts)


def test_spill_then_restore_gives_identical_continuation(path, tmp_path):
    engine = make_engine(path, max_model_len=1024, kv_cache_gb=0.02, spill_gb=0.01, spill_dir=str(tmp_path))
    clock = [0.0]
    engine.kv.pins.clock = lambda: clock[0]
    history = random_prompts(1, [250], seed=21)[0]
    first, _, _ = _run_one(engine, history, session="s", ttl=5)
    follow_up = history + first + random_prompts(1, [30], seed=22)[0]
    expected, _, _ = _run_one(make_engine(path, max_model_len=1024, kv_cache_gb=0.02), follow_up)
    clock[0] = 10  # the tool took longer than the TTL: the pin spills to disk
    engine.step()
    assert not engine.kv.pins.pins
    assert engine.kv.spill.spilled_blocks == len(history + first) // 16
    # evict everything cached in memory, so only the disk copy can serve the prefix
    engine.kv.pool.allocate(engine.kv.pool.num_free)
    engine.kv.pool.release(range(engine.kv.pool.num_blocks))
    assert not engine.kv.pool.cached
    got, req, computed = _run_one(engine, follow_up, session="s", ttl=5)
    assert engine.kv.spill.restored_blocks == len(history + first) // 16
    assert req.num_cached_tokens == 16 * (len(history + first) // 16)
    assert computed == len(follow_up) - req.num_cached_tokens + REPLY - 1
    assert got == expected


def test_shared_prefix_blocks_count_once_against_the_pin_budget():
    from agentcpu.kvcache.block_pool import BlockPool
    from agentcpu.kvcache.pins import SessionPins

    pool = BlockPool(16)
    shared, own_a, own_b = pool.allocate(4), pool.allocate(2), pool.allocate(2)
    pins = SessionPins(pool, block_size=16, budget_blocks=8)
    pins.pin("a", shared + own_a, ttl_s=60)
    pins.pin("b", shared + own_b, ttl_s=60)  # 8 distinct blocks: fits, nobody evicted
    assert pins.num_pinned_blocks == 8 and set(pins.pins) == {"a", "b"}
    pins.unpin("a")
    assert pins.num_pinned_blocks == 6  # the shared prefix is still held by b
    pins.pin("c", pool.allocate(3), ttl_s=60)  # 9 distinct > 8: the oldest pin goes
    assert set(pins.pins) == {"c"} and pins.num_pinned_blocks == 3


@pytest.mark.parametrize("kept_reply_tokens", [REPLY - 1, 3])
def test_partly_shared_block_is_copied_and_continues_identically(path, kept_reply_tokens):
    """A turn's history ends mid-block (and a client may send the reply back re-rendered,
    diverging inside it): the shared tokens of that block are copied from the pin, not
    recomputed, and the next turn's output equals a cold engine's. The next turn comes
    under another session id, as an OpenAI client without one would (anonymous pins are
    matched by their blocks)."""
    engine = make_engine(path, max_model_len=1024, kv_cache_gb=0.02)
    history = random_prompts(1, [250], seed=31)[0]
    first, _, _ = _run_one(engine, history, session="anon:1", ttl=60)
    other = [(t + 1) % 500 for t in first[kept_reply_tokens:]]
    follow_up = history + first[:kept_reply_tokens] + other + random_prompts(1, [30], seed=32)[0]
    shared = len(history) + kept_reply_tokens
    assert shared % engine.kv.block_size, "the divergence must fall inside a block"
    expected, _, _ = _run_one(make_engine(path, max_model_len=1024, kv_cache_gb=0.02), follow_up)
    got, req, computed = _run_one(engine, follow_up, session="anon:2", ttl=60)
    assert req.num_cached_tokens == shared
    assert computed == len(follow_up) - shared + REPLY - 1
    assert got == expected


def _tight_engine(path, num_blocks, **options):
    block_bytes = 2 * 3 * 16 * 2 * 16 * 4  # k+v, layers, block, kv heads, head dim, fp32
    return make_engine(
        path, max_model_len=1024, kv_cache_gb=num_blocks * block_bytes / 2**30, **options
    )


def _turn_filling(engine, history, first, num_blocks):
    """The next turn of `history`, long enough to need `num_blocks` blocks at admission."""
    extra = 16 * num_blocks - len(history) - len(first) - REPLY
    return history + first + random_prompts(1, [extra], seed=42)[0]


def test_partial_copy_keeps_its_source_when_its_pin_gives_way(path):
    """Both pins are released under pressure while the next turn allocates: the block to
    copy from stays readable until the copy is done, then is freed like any other."""
    engine = _tight_engine(path, 20)
    history = random_prompts(1, [100], seed=41)[0]  # 107 computed: 6 full blocks + a tail
    first, _, _ = _run_one(engine, history, session="s", ttl=60)
    _run_one(engine, random_prompts(1, [40], seed=43)[0], session="t", ttl=60)  # 3 blocks
    assert engine.kv.pins.pins["s"].tail_block is not None
    follow_up = _turn_filling(engine, history, first, 18)  # 12 new blocks, 10 free
    expected, _, _ = _run_one(make_engine(path, max_model_len=1024, kv_cache_gb=0.02), follow_up)
    got, req, _ = _run_one(engine, follow_up, session="other", ttl=0)
    assert engine.kv.pins.stats.released_pressure == 2
    assert req.num_cached_tokens == len(history) + len(first) - 1
    assert got == expected
    assert all(c == 0 for c in engine.kv.pool.ref_counts)


def test_partial_copy_is_dropped_when_its_source_is_the_block_missing(path):
    """When only the copy's source block stands between the next turn and a fit, the
    tokens are recomputed instead: the request is admitted, nothing is refused."""
    engine = _tight_engine(path, 20)
    history = random_prompts(1, [100], seed=41)[0]
    first, _, _ = _run_one(engine, history, session="s", ttl=60)
    follow_up = _turn_filling(engine, history, first, 20)  # every block of the pool
    expected, _, _ = _run_one(make_engine(path, max_model_len=1024, kv_cache_gb=0.02), follow_up)
    got, req, _ = _run_one(engine, follow_up, session="other", ttl=0)
    assert req.num_cached_tokens == 16 * 6 and req.num_preemptions == 0
    assert got == expected
    assert all(c == 0 for c in engine.kv.pool.ref_counts)


def _tight_spilling_engine(path, num_blocks, spill_dir):
    return _tight_engine(path, num_blocks, spill_gb=0.01, spill_dir=str(spill_dir))


def test_pin_released_under_pressure_is_restored_from_disk(path, tmp_path):
    """The pressure case of the agent benchmark: a session's pin gives way to other
    traffic and its blocks are evicted before it returns. They were written to disk on
    eviction, so the session's next turn restores them instead of recomputing them, and
    continues exactly as a cold engine would."""
    engine = _tight_spilling_engine(path, 44, tmp_path)
    history = random_prompts(1, [200], seed=51)[0]
    first, _, _ = _run_one(engine, history, session="agent", ttl=60)
    full_blocks = (len(history) + REPLY - 1) // 16  # computed tokens in whole blocks
    big = random_prompts(1, [44 * 16 - REPLY], seed=52)[0]  # needs every block of the pool
    _run_one(engine, big)
    assert engine.kv.pins.stats.released_pressure == 1
    assert engine.kv.spill.spilled_blocks >= full_blocks  # its blocks and the burst's
    assert not engine.kv.pool.cached.keys() & engine.kv.spill.index.keys()
    follow_up = history + first + random_prompts(1, [30], seed=53)[0]
    expected, _, _ = _run_one(make_engine(path, max_model_len=1024, kv_cache_gb=0.02), follow_up)
    restored_before = engine.kv.spill.restored_blocks
    got, req, computed = _run_one(engine, follow_up, session="agent", ttl=60)
    assert engine.kv.spill.restored_blocks - restored_before == full_blocks
    assert req.num_cached_tokens == 16 * full_blocks
    assert computed == len(follow_up) - 16 * full_blocks + REPLY - 1
    assert got == expected


def test_without_spill_the_released_session_is_recomputed(path):
    """The control for the test above: same traffic, no disk store."""
    engine = _tight_engine(path, 44)
    history = random_prompts(1, [200], seed=51)[0]
    first, _, _ = _run_one(engine, history, session="agent", ttl=60)
    _run_one(engine, random_prompts(1, [44 * 16 - REPLY], seed=52)[0])
    follow_up = history + first + random_prompts(1, [30], seed=53)[0]
    _, req, _ = _run_one(engine, follow_up, session="agent", ttl=60)
    assert req.num_cached_tokens == 0


def test_a_failing_spill_write_loses_only_the_block(path, tmp_path):
    """The spill directory vanishes (disk gone): evictions go on, nothing is stored, the
    evicted prefix is recomputed and the output is still right."""
    import shutil

    spill_dir = tmp_path / "kv"
    engine = _tight_spilling_engine(path, 44, spill_dir)
    history = random_prompts(1, [200], seed=61)[0]
    first, _, _ = _run_one(engine, history, session="agent", ttl=60)
    shutil.rmtree(spill_dir)
    _run_one(engine, random_prompts(1, [44 * 16 - REPLY], seed=62)[0])
    assert engine.kv.spill.failed_writes > 0 and engine.kv.spill.spilled_blocks == 0
    follow_up = history + first + random_prompts(1, [30], seed=63)[0]
    expected, _, _ = _run_one(make_engine(path, max_model_len=1024, kv_cache_gb=0.02), follow_up)
    got, req, _ = _run_one(engine, follow_up, session="agent", ttl=60)
    assert req.num_cached_tokens == 0 and got == expected


def test_restore_makes_room_by_releasing_pins(path, tmp_path):
    """A returning session's stored run is longer than the free blocks because another
    session's pin and a running request hold the pool: the pin gives way (as it would
    for an allocation) and the run is restored, not recomputed."""
    engine = _tight_spilling_engine(path, 44, tmp_path)
    history = random_prompts(1, [200], seed=71)[0]
    first, _, _ = _run_one(engine, history, session="a", ttl=60)
    full_blocks = (len(history) + REPLY - 1) // 16
    _run_one(engine, random_prompts(1, [44 * 16 - REPLY], seed=72)[0])  # evicts a's blocks
    _run_one(engine, random_prompts(1, [300], seed=73)[0], session="b", ttl=60)  # pins 19 blocks
    follow_up = history + first + random_prompts(1, [30], seed=74)[0]
    expected, _, _ = _run_one(make_engine(path, max_model_len=1024, kv_cache_gb=0.02), follow_up)
    running = engine.add_request(random_prompts(1, [240], seed=75)[0], greedy(REPLY))
    a = engine.add_request(follow_up, greedy(REPLY), session_id="a", pin_ttl_s=60)
    engine.step()  # `running` takes 16 blocks: with b's pin, fewer than a's run are free
    assert engine.kv.pins.stats.released_pressure == 2  # a's pin (burst), then b's
    assert a.num_cached_tokens == 16 * full_blocks
    got = None
    while engine.has_unfinished():
        for o in engine.step():
            if o.request_id == a.request_id and o.finished:
                got = o.token_ids
    assert got == expected and running.num_preemptions == 0
