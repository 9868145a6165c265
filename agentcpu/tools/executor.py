"""Runs tool calls concurrently and never raises: every failure becomes an error result.

The agent loop hands the executor the calls of one model turn; they run as asyncio tasks
(blocking tools in the executor's own thread pool, so they neither block the event loop nor
starve the loop's default pool), each under a per-call timeout, at most `max_workers` at a
time. The executor also keeps a moving average of each tool's latency, which the server
uses as the KV pin time-to-live of sessions waiting on that tool.

A blocking (sync) tool that times out is reported as timed out at once, but its thread
cannot be killed: it keeps a pool worker until the function returns.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from agentcpu.tools.registry import (
    ToolArgumentsError,
    ToolError,
    ToolRegistry,
    ToolResult,
    UnknownToolError,
    to_content,
)

DEFAULT_MAX_WORKERS = 8
DEFAULT_TIMEOUT_S = 60.0
# Weight of the newest sample in the latency moving average: ~the last 10 calls matter.
LATENCY_EMA_ALPHA = 0.2
# A tool result longer than this is cut (head and tail kept) so one call cannot flood the context.
DEFAULT_MAX_RESULT_CHARS = 32_000


@dataclass(frozen=True)
class ToolCall:
    """One call the model asked for; `arguments` as the model wrote them (JSON text) or decoded."""

    name: str
    arguments: dict[str, Any] | str | None = None
    id: str = ""

    @classmethod
    def from_openai(cls, call: dict[str, Any]) -> ToolCall:
        """From an OpenAI `tool_calls` entry: {"id", "type": "function", "function": {...}}."""
        function = call.get("function") or {}
        return cls(
            name=function.get("name", ""),
            arguments=function.get("arguments"),
            id=call.get("id", ""),
        )


@dataclass
class _LatencyStats:
    ema_s: float | None = None
    calls: int = 0
    failures: int = 0

    def add(self, elapsed_s: float, ok: bool) -> None:
        self.calls += 1
        self.failures += not ok
        if self.ema_s is None:
            self.ema_s = elapsed_s
        else:
            self.ema_s += LATENCY_EMA_ALPHA * (elapsed_s - self.ema_s)


@dataclass
class ToolExecutor:
    """Runs calls against `registry`. Call `close()` (or use `async with`) to free the pool."""

    registry: ToolRegistry
    max_workers: int = DEFAULT_MAX_WORKERS
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_result_chars: int = DEFAULT_MAX_RESULT_CHARS
    _pool: ThreadPoolExecutor = field(init=False, repr=False)
    _slots: asyncio.Semaphore = field(init=False, repr=False)
    _stats: dict[str, _LatencyStats] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {self.max_workers}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        self._pool = ThreadPoolExecutor(self.max_workers, thread_name_prefix="agentcpu-tool")
        self._slots = asyncio.Semaphore(self.max_workers)

    async def run(
        self,
        name: str,
        arguments: dict[str, Any] | str | None = None,
        *,
        timeout_s: float | None = None,
    ) -> ToolResult:
        """Run one call; the result's content is "error: ..." when anything went wrong."""
        try:
            tool = self.registry.get(name)
            decoded = self.registry.validate_arguments(name, arguments)
        except (UnknownToolError, ToolArgumentsError) as e:
            return ToolResult(ok=False, content=f"error: {e}")
        limit = timeout_s or tool.timeout_s or self.timeout_s
        async with self._slots:
            start = time.perf_counter()
            ok, content = await self._call(tool, decoded, limit)
            elapsed = time.perf_counter() - start
        self._stats.setdefault(name, _LatencyStats()).add(elapsed, ok)
        return ToolResult(ok=ok, content=self._bounded(content), elapsed_s=elapsed)

    async def run_all(
        self, calls: Sequence[ToolCall], *, timeout_s: float | None = None
    ) -> list[ToolResult]:
        """Run the calls of one turn concurrently; results in the calls' order."""
        tasks = [self.run(c.name, c.arguments, timeout_s=timeout_s) for c in calls]
        return list(await asyncio.gather(*tasks))

    async def _call(self, tool, arguments: dict[str, Any], limit: float) -> tuple[bool, str]:
        timer = asyncio.timeout(limit)
        try:
            async with timer:
                if tool.blocking:
                    loop = asyncio.get_running_loop()
                    value = await loop.run_in_executor(self._pool, tool.call_blocking, arguments)
                else:
                    value = await tool.call(arguments)
            return True, to_content(value)
        except TimeoutError as e:
            if timer.expired():
                return False, f"error: tool {tool.name!r} timed out after {limit:g} s"
            return False, f"error: tool {tool.name!r} raised TimeoutError: {e}"
        except ToolError as e:
            return False, f"error: tool {tool.name!r}: {e}"
        except (
            Exception,
            SystemExit,
        ) as e:  # a bug in any tool is the model's to read, not a crash
            return False, f"error: tool {tool.name!r} raised {type(e).__name__}: {e}"

    def _bounded(self, content: str) -> str:
        if len(content) <= self.max_result_chars:
            return content
        head = self.max_result_chars * 3 // 4
        tail = self.max_result_chars - head
        cut = len(content) - head - tail
        return f"{content[:head]}\n... [{cut} characters cut] ...\n{content[-tail:]}"

    def latency_ema(self, name: str) -> float | None:
        """Moving average of the tool's call time in seconds; None before its first call."""
        stats = self._stats.get(name)
        return stats.ema_s if stats else None

    def stats(self) -> dict[str, dict[str, float | int | None]]:
        """Per tool: calls, failures, latency EMA (for metrics)."""
        return {
            n: {"calls": s.calls, "failures": s.failures, "latency_ema_s": s.ema_s}
            for n, s in self._stats.items()
        }

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def __aenter__(self) -> ToolExecutor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
