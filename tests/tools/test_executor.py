"""ToolExecutor: concurrency, timeouts, every failure as an error result, latency EMA."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from agentcpu.tools.executor import LATENCY_EMA_ALPHA, ToolCall, ToolExecutor
from agentcpu.tools.python_tools import FunctionTool
from agentcpu.tools.registry import ToolRegistry

BARRIER_TIMEOUT_S = 10.0


def make_registry(*fns) -> ToolRegistry:
    return ToolRegistry(FunctionTool(f) for f in fns)


def run(coro):
    return asyncio.run(coro)


def test_async_and_blocking_calls_run_concurrently():
    # Each tool waits until all three are inside it: only concurrent execution gets through.
    thread_barrier = threading.Barrier(3, timeout=BARRIER_TIMEOUT_S)
    order: list[str] = []

    def blocking(tag: str) -> str:
        order.append(f"start {tag}")
        thread_barrier.wait()
        order.append(f"end {tag}")
        return tag

    async def main():
        task_barrier = asyncio.Barrier(3)

        async def cooperative(tag: str) -> str:
            async with asyncio.timeout(BARRIER_TIMEOUT_S):
                await task_barrier.wait()
            return tag

        reg = make_registry(blocking, cooperative)
        async with ToolExecutor(reg, max_workers=3, timeout_s=30) as ex:
            calls = [ToolCall("blocking", {"tag": t}) for t in "abc"]
            threaded = await ex.run_all(calls)
            awaited = await ex.run_all(
                [ToolCall("cooperative", f'{{"tag": "{t}"}}') for t in "xyz"]
            )
        return threaded, awaited

    threaded, awaited = run(main())
    assert [r.content for r in threaded] == ["a", "b", "c"] and all(r.ok for r in threaded)
    assert [r.content for r in awaited] == ["x", "y", "z"] and all(r.ok for r in awaited)
    assert all(o.startswith("start") for o in order[:3])  # all three began before any ended


def test_max_workers_bounds_concurrency():
    active, peak = 0, 0

    async def probe() -> int:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.02)
        active -= 1
        return peak

    async def main():
        async with ToolExecutor(make_registry(probe), max_workers=2, timeout_s=30) as ex:
            return await ex.run_all([ToolCall("probe")] * 6)

    assert all(r.ok for r in run(main())) and peak == 2


def test_failures_become_error_results():
    def raises(x: int) -> int:
        raise ValueError(f"bad value {x}")

    def junk() -> object:
        return {1, 2}

    def exits() -> None:
        raise SystemExit(3)

    async def hangs() -> str:
        await asyncio.sleep(60)
        return "never"

    def blocks() -> str:
        time.sleep(0.5)
        return "late"

    async def main():
        reg = make_registry(raises, junk, exits, hangs, blocks)
        async with ToolExecutor(reg, max_workers=4, timeout_s=0.2) as ex:
            return await ex.run_all(
                [
                    ToolCall("raises", {"x": 7}),
                    ToolCall("junk"),
                    ToolCall("exits"),
                    ToolCall("hangs"),
                    ToolCall("blocks"),
                    ToolCall("raises", {"x": "seven"}),
                    ToolCall("nope", {}),
                    ToolCall("raises", "{not json"),
                ]
            )

    results = run(main())
    assert not any(r.ok for r in results)
    assert all(r.content.startswith("error: ") for r in results)
    contents = [r.content for r in results]
    assert "ValueError: bad value 7" in contents[0]
    assert "not JSON-serialisable" in contents[1]
    assert "SystemExit" in contents[2]
    assert "timed out after 0.2 s" in contents[3] and "timed out" in contents[4]
    assert "invalid arguments for tool 'raises' at 'x'" in contents[5]
    assert "unknown tool 'nope'" in contents[6]
    assert "not valid JSON" in contents[7]


def test_tool_raising_timeout_error_is_not_reported_as_our_timeout():
    async def remote() -> str:
        raise TimeoutError("upstream slow")

    async def main():
        async with ToolExecutor(make_registry(remote), timeout_s=5) as ex:
            return await ex.run("remote")

    result = run(main())
    assert not result.ok and "raised TimeoutError: upstream slow" in result.content


def test_latency_ema_updates_per_tool_and_long_results_are_cut():
    async def quick(n: int = 10) -> str:
        await asyncio.sleep(0)
        return "x" * n

    async def main():
        async with ToolExecutor(make_registry(quick), timeout_s=5, max_result_chars=100) as ex:
            assert ex.latency_ema("quick") is None
            first = await ex.run("quick")
            assert ex.latency_ema("quick") == pytest.approx(first.elapsed_s)
            second = await ex.run("quick", {"n": 1000})
            await ex.run("quick", {"n": "bad"})  # rejected before running: not a latency sample
            return first, second, ex.latency_ema("quick"), ex.stats()

    first, second, ema, stats = run(main())
    expected = first.elapsed_s + LATENCY_EMA_ALPHA * (second.elapsed_s - first.elapsed_s)
    assert ema == pytest.approx(expected)
    assert stats["quick"]["calls"] == 2 and stats["quick"]["failures"] == 0
    assert "characters cut" in second.content and len(second.content) < 200


def test_from_openai_tool_call():
    call = ToolCall.from_openai(
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    )
    assert call == ToolCall(name="f", arguments='{"a": 1}', id="c1")


def test_bad_executor_settings_are_refused():
    with pytest.raises(ValueError, match="max_workers"):
        ToolExecutor(ToolRegistry(), max_workers=0)
    with pytest.raises(ValueError, match="timeout_s"):
        ToolExecutor(ToolRegistry(), timeout_s=0)
