"""A live progress bar (rich) for served benchmarks: one bar per run of a load level."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from agentcpu.bench.metrics import RequestResult


class LiveProgress:
    """`with LiveProgress() as live: sink = live.level("vllm r1 c=16", total=16)`.

    Disabled (or off a terminal) it prints one line per finished level instead.
    """

    def __init__(self, enabled: bool = True, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.enabled = enabled and self.console.is_terminal
        self.progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("errors {task.fields[errors]}"), TimeElapsedColumn(),
            console=self.console, disable=not self.enabled,
        )  # fmt: skip

    def __enter__(self) -> LiveProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def log(self, message: str) -> None:
        self.console.print(message, highlight=False)

    def level(self, description: str, total: int) -> Callable[[RequestResult], None]:
        """A result sink that advances a new bar of `total` requests."""
        task = self.progress.add_task(description, total=total, errors=0)
        done = errors = 0

        def sink(result: RequestResult) -> None:
            nonlocal done, errors
            done, errors = done + 1, errors + (not result.ok)
            self.progress.update(task, advance=1, errors=errors)
            if not self.enabled and done == total:
                self.log(f"  {description}: {done} requests, {errors} errors")

        return sink
