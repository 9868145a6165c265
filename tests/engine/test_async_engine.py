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


class _OneRequestServer:
    """Stands in for uvicorn.Server in `serve_with_engine_on_main_thread`: its `run`
    (on the HTTP thread) streams one request through the engine, which runs here."""

    def __init__(self, front: AsyncEngine, prompt, fail: bool = False):
        self.front, self.prompt, self.fail = front, prompt, fail
        self.started = False
        self.should_exit = False
        self.outputs: list = []

    def run(self) -> None:
        if self.fail:  # uvicorn logs the bind error and returns without starting
            return
        self.started = True

        async def go():
            self.outputs = [o async for o in self.front.generate(self.prompt, greedy(6), "m0")]

        asyncio.run(go())


def test_engine_loop_on_the_main_thread_serves_and_stops(engine):
    from agentcpu.commands.serve import serve_with_engine_on_main_thread

    prompt = random_prompts(1, [9], seed=8)[0]
    expected = run_all(engine, [prompt], greedy(6))
    front = AsyncEngine(engine, own_thread=False)
    server = _OneRequestServer(front, prompt)
    assert serve_with_engine_on_main_thread(server, front) == 0
    assert server.outputs[-1].finished and server.outputs[-1].token_ids == expected[0]
    threaded = AsyncEngine(engine)
    try:
        with pytest.raises(RuntimeError, match="own thread"):
            threaded.run_here()
    finally:
        threaded.shutdown()


def test_a_server_that_cannot_start_stops_the_engine_with_status_1(engine):
    from agentcpu.commands.serve import serve_with_engine_on_main_thread

    front = AsyncEngine(engine, own_thread=False)
    server = _OneRequestServer(front, [1, 2, 3], fail=True)
    assert serve_with_engine_on_main_thread(server, front) == 1


def test_run_beside_engine_returns_or_raises_what_the_work_did(engine):
    from agentcpu.engine.async_engine import run_beside_engine

    prompt = random_prompts(1, [7], seed=9)[0]
    expected = run_all(engine, [prompt], greedy(5))

    front = AsyncEngine(engine, own_thread=False)

    async def collect():
        return [o async for o in front.generate(prompt, greedy(5), "w0")]

    outputs = run_beside_engine(front, lambda: asyncio.run(collect()))
    assert outputs[-1].finished and outputs[-1].token_ids == expected[0]

    def broken():
        raise ValueError("work failed")

    with pytest.raises(ValueError, match="work failed"):
        run_beside_engine(AsyncEngine(engine, own_thread=False), broken)


def test_a_stopped_engine_fails_its_waiting_streams(engine):
    """Shutdown (or Ctrl-C on the engine's thread) must not leave a caller waiting forever."""
    from agentcpu.engine.async_engine import run_beside_engine

    front = AsyncEngine(engine, own_thread=False)
    prompt = random_prompts(1, [7], seed=10)[0]

    async def wait_forever():
        front.call(lambda eng: front.shutdown())  # the engine stops while the request runs
        return [o async for o in front.generate(prompt, greedy(50), "s0")]

    with pytest.raises(RuntimeError, match="engine stopped"):
        run_beside_engine(front, lambda: asyncio.run(wait_forever()))
    assert not engine.has_unfinished()  # its request was aborted, its blocks freed


def test_a_stream_whose_loop_closed_is_aborted_and_the_engine_goes_on(engine):
    """The HTTP server shut down (its event loop closed) with a request in flight: the
    engine thread must free that request's KV and keep serving, not die on RuntimeError."""
    from agentcpu.engine.async_engine import _Stream

    front = AsyncEngine(engine)
    orphan_loop = asyncio.new_event_loop()
    orphan = _Stream(orphan_loop, asyncio.Queue())
    orphan_loop.close()
    options = {"constraint": None, "session_id": None, "pin_ttl_s": None}
    try:
        front._send(("add", "orphan", random_prompts(1, [20])[0], greedy(50), orphan, options))

        async def main():
            for _ in range(200):
                state = front.call(lambda e: (e.kv.pool.num_used, e.has_unfinished())).result(5)
                if state == (0, False):
                    break
                await asyncio.sleep(0.02)
            after = await _collect(front, random_prompts(1, [5], seed=3)[0], greedy(4), "after")
            return state, after

        state, after = asyncio.run(main())
        assert state == (0, False) and front.num_streams == 0
        assert front._thread.is_alive() and after[-1].finished and len(after[-1].token_ids) == 4
    finally:
        front.shutdown()
