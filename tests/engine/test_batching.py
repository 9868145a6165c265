"""Continuous batching gives the same greedy tokens as running prompts one at a time."""

from __future__ import annotations

import pytest

from tests.engine.helpers import greedy, make_engine, random_prompts, run_all

LENGTHS = [5, 17, 33, 64, 1, 100, 48, 16]
GEN = 12


@pytest.fixture(scope="module")
def model_path(checkpoint_dir):
    return checkpoint_dir("qwen2")


@pytest.fixture(scope="module")
def reference_outputs(model_path):
    engine = make_engine(model_path)
    prompts = random_prompts(16, LENGTHS)
    return prompts, [run_all(engine, [p], greedy(GEN))[0] for p in prompts]


def test_batched_equals_one_at_a_time(model_path, reference_outputs):
    prompts, expected = reference_outputs
    engine = make_engine(model_path)
    assert run_all(engine, prompts, greedy(GEN)) == expected
    assert engine.kv.pool.num_used == 0


def test_chunked_prefill_tiny_chunks(model_path, reference_outputs):
    prompts, expected = reference_outputs
    engine = make_engine(model_path, max_num_batched_tokens=7)
    assert run_all(engine, prompts, greedy(GEN)) == expected


def test_prefix_hit_gives_same_tokens(model_path, reference_outputs):
    prompts, expected = reference_outputs
    engine = make_engine(model_path)
    run_all(engine, prompts, greedy(GEN))
    again = run_all(engine, prompts, greedy(GEN))
    assert again == expected
    assert engine.stats.cached_prompt_tokens > 0


def test_preemption_gives_same_tokens(model_path, reference_outputs):
    prompts, expected = reference_outputs
    # 16 requests of up to 112 tokens on a pool of ~24 blocks of 16 slots: must preempt.
    engine = make_engine(model_path, kv_cache_gb=24 * 16 * 2 * 3 * 32 * 4 / 2**30, max_num_seqs=16)
    assert engine.kv.pool.num_blocks < 30
    out = run_all(engine, prompts, greedy(GEN))
    assert engine.stats.preemptions > 0
    assert out == expected
    assert engine.kv.pool.num_used == 0


def test_prefix_reuse_computes_only_new_tokens(checkpoint_dir):
    path = checkpoint_dir("qwen2", max_position_embeddings=1024)
    engine = make_engine(path, max_model_len=1024, kv_cache_gb=0.05)
    prefix = random_prompts(1, [500], seed=7)[0]
    first = prefix + random_prompts(1, [20], seed=8)[0]
    second = prefix + random_prompts(1, [30], seed=9)[0]
    run_all(engine, [first], greedy(4))
    before = engine.stats.computed_tokens
    engine.add_request(second, greedy(4))
    req = engine.scheduler.waiting[0]
    while engine.has_unfinished():
        engine.step()
    computed = engine.stats.computed_tokens - before
    cached = (500 // 16) * 16
    assert req.num_cached_tokens == cached
    # only the uncached prompt tokens plus the 3 fed-back outputs were computed
    assert computed == len(second) - cached + 3


@pytest.mark.parametrize("budget", [64, 512])
def test_a_burst_on_one_prefix_computes_it_once(checkpoint_dir, budget):
    """Requests arriving together with a shared prefix wait for the first one's blocks
    instead of computing them again in parallel chunks (scheduler._next_block_in_flight),
    and still give the tokens they give alone."""
    path = checkpoint_dir("qwen2", max_position_embeddings=1024)
    prefix = random_prompts(1, [300], seed=7)[0]
    prompts = [prefix + tail for tail in random_prompts(6, [20, 45, 7], seed=11)]
    alone = [
        run_all(make_engine(path, max_model_len=1024, kv_cache_gb=0.05), [p], greedy(3))[0]
        for p in prompts[:2]
    ]
    engine = make_engine(path, max_model_len=1024, kv_cache_gb=0.05, max_num_batched_tokens=budget)
    outputs = run_all(engine, prompts, greedy(3))
    assert outputs[:2] == alone
    shared = (300 // 16) * 16  # whole blocks of the prefix
    prompt_tokens = len(prompts[0]) + sum(len(p) - shared for p in prompts[1:])
    assert engine.stats.computed_tokens == prompt_tokens + 2 * len(prompts)  # + fed-back outputs
    assert engine.kv.pool.num_used == 0
