"""Run the embedded model as an agent on generated tasks, many at once.

Every task is an agent run (`agents/loop.py`) over the same AsyncEngine, so the shared
system prompt + tool schemas are prefilled once and served from the prefix cache after.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

from agentcpu.agents.loop import AgentLoop, AgentRun
from agentcpu.demo.agent_tools import demo_registry
from agentcpu.demo.tasks import SYSTEM_PROMPT, Task, check_answer, generate_tasks
from agentcpu.engine.async_engine import AsyncEngine
from agentcpu.engine.sampling_params import SamplingParams
from agentcpu.tools.executor import ToolExecutor

DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo-model"
MAX_REPLY_TOKENS = 128


@dataclass
class TaskOutcome:
    task: Task
    run: AgentRun
    correct: bool
    seconds: float
    error: str | None = None


@dataclass
class DemoReport:
    outcomes: list[TaskOutcome] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def success_rate(self) -> float:
        return sum(o.correct for o in self.outcomes) / max(1, len(self.outcomes))

    @property
    def generated_tokens(self) -> int:
        return sum(o.run.completion_tokens for o in self.outcomes)

    @property
    def cached_share(self) -> float:
        prompt = sum(o.run.prompt_tokens for o in self.outcomes)
        return sum(o.run.cached_tokens for o in self.outcomes) / max(1, prompt)


async def run_demo(
    engine: AsyncEngine,
    tokenizer,
    tool_format: str | None,
    num_tasks: int,
    seed: int,
    concurrency: int,
    constrain: bool = True,
    on_done=None,
) -> DemoReport:
    """Run `num_tasks` generated tasks, at most `concurrency` at a time."""
    executor = ToolExecutor(demo_registry())
    loop = AgentLoop(engine, tokenizer, executor, tool_format=tool_format, constrain_tool_calls=constrain)
    slots = asyncio.Semaphore(concurrency)
    report = DemoReport()
    start = time.perf_counter()

    async def one(task: Task) -> None:
        async with slots:
            outcome = await _run_task(loop, task)
        report.outcomes.append(outcome)
        if on_done is not None:
            on_done(outcome)

    try:
        await asyncio.gather(*(one(t) for t in generate_tasks(seed, num_tasks)))
    finally:
        executor.close()
    report.wall_s = time.perf_counter() - start
    return report


async def _run_task(loop: AgentLoop, task: Task) -> TaskOutcome:
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": task.user}]
    params = SamplingParams(max_tokens=MAX_REPLY_TOKENS, temperature=0)
    run = AgentRun(messages=[])
    start = time.perf_counter()
    error = None
    try:
        async for _ in loop.run(messages, params, run=run):
            pass
    except Exception as e:  # one broken task must not stop the demo
        error = f"{type(e).__name__}: {e}"
    correct = error is None and check_answer(task, run.final_text)
    return TaskOutcome(task, run, correct, time.perf_counter() - start, error)
