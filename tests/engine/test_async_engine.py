"""The async front door: concurrent streams, typed refusals, abort on early exit."""

from __future__ import annotations

import asyncio

import pytest

from agentcpu.engine.async_engine import AsyncEngine
from agentcpu.errors import ContextLengthError
from tests.engine.helpers import greedy, make_engine, random_prompts, run_all


@pytest.fixture(scope="module")
def engine(checkpoint_dir):
    return make_engine(checkpoint_dir("llama"))


async def _collect(front: AsyncEngine, prompt, params, rid):
    outs = [o async for o in front.generate(prompt, params, rid)]
    return outs


def test_concurrent_streams_match_offline(engine):
    prompts = random_prompts(6, [3, 30, 12], seed=5)
    expected = run_all(engine, prompts, greedy(8))
    front = AsyncEngine(engine)

    async def main():
        return await asyncio.gather(
            *(_collect(front, p, greedy(8), f"a{i}") for i, p in enumerate(prompts))
        )

    try:
        results = asyncio.run(main())
    finally:
        front.shutdown()
    assert [r[-1].token_ids for r in results] == expected
    assert all(len(r) == 8 and r[-1].finished for r in results)
    assert [o.delta_token_ids[0] for o in results[0]] == expected[0]


def test_refusal_is_typed(engine):
    front = AsyncEngine(engine)

    async def main():
        return await _collect(front, [1] * 600, greedy(8), "too-long")

    try:
        with pytest.raises(ContextLengthError):
            asyncio.run(main())
    finally:
        front.shutdown()


def test_leaving_early_aborts_and_frees_blocks(engine):
    front = AsyncEngine(engine)

    async def main():
        async for out in front.generate(random_prompts(1, [40])[0], greedy(200), "leaver"):
            if len(out.token_ids) == 3:
                break
        for _ in range(100):
            used = front.call(lambda e: (e.kv.pool.num_used, e.has_unfinished())).result(5)
            if used == (0, False):
                return used
            await asyncio.sleep(0.02)
        return used

    try:
        assert asyncio.run(main()) == (0, False)
    finally:
        front.shutdown()
