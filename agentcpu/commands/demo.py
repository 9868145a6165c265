"""`agentcpu demo`: the embedded model solves generated tool-use tasks, concurrently.

Shows live progress, then the task success rate, tokens/s and the share of prompt tokens
served from the prefix cache; exits 1 when the success rate is below `--min-success`.
"""

from __future__ import annotations

import argparse
import asyncio

from agentcpu.commands.engine_args import add_engine_arguments, engine_options
from agentcpu.hardware.allocator import freeze_loaded_objects


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser, model_required=False)
    parser.add_argument("--tasks", type=int, default=48, help="number of generated tasks")
    parser.add_argument("--seed", type=int, default=20261124, help="task generator seed")
    parser.add_argument("--concurrency", type=int, default=16, help="agents running at once")
    parser.add_argument("--min-success", type=float, default=0.9, help="exit 1 below this success rate")
    parser.add_argument("--trace", action="store_true", help="print every task's conversation")
    parser.add_argument("--no-constrain", action="store_true", help="do not grammar-constrain tool calls")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from agentcpu.demo.runner import DEMO_MODEL_DIR, run_demo
    from agentcpu.engine.async_engine import AsyncEngine, run_beside_engine
    from agentcpu.llm import LLM
    from agentcpu.tools.parsers import detect_tool_format

    console = Console()
    llm = LLM(args.model or str(DEMO_MODEL_DIR), **engine_options(args))
    freeze_loaded_objects()  # the loaded model stays out of the collector's walks
    tool_format = detect_tool_format(llm.tokenizer.chat_template)
    front = AsyncEngine(llm.engine, own_thread=False)  # the engine loop gets the main thread
    columns = (TextColumn("[bold]agents"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[ok]} correct"), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("tasks", total=args.tasks, ok=0)
        correct = [0]

        def done(outcome):
            correct[0] += outcome.correct
            progress.update(bar, advance=1, ok=correct[0])
            if args.trace:
                _print_trace(console, outcome)

        def agents():
            return asyncio.run(run_demo(front, llm.tokenizer, tool_format, args.tasks, args.seed,
                                        args.concurrency, not args.no_constrain, done))

        report = run_beside_engine(front, agents, name="agentcpu-agents")
    _print_summary(console, report, llm.engine)
    return 0 if report.success_rate >= args.min_success else 1


def _print_trace(console, outcome) -> None:
    mark = "[green]ok[/]" if outcome.correct else "[red]wrong[/]"
    console.print(f"\n{mark} [bold]{outcome.task.user}[/] (expected {outcome.task.expected!r})")
    for m in outcome.run.messages[2:]:
        if m.get("tool_calls"):
            for c in m["tool_calls"]:
                console.print(f"  [cyan]call[/] {c['function']['name']}({c['function']['arguments']})")
        elif m["role"] == "tool":
            console.print(f"  [magenta]result[/] {m['content']}")
        else:
            console.print(f"  [yellow]answer[/] {m.get('content')}")
    if outcome.error:
        console.print(f"  [red]error[/] {outcome.error}")


def _print_summary(console, report, engine) -> None:
    tools = sum(o.run.tool_calls for o in report.outcomes)
    console.print(
        f"\n[bold]success[/] {report.success_rate:.1%} of {len(report.outcomes)} tasks   "
        f"[bold]wall[/] {report.wall_s:.1f} s   "
        f"[bold]generated[/] {report.generated_tokens} tokens ({report.generated_tokens / max(report.wall_s, 1e-9):.1f} tok/s)   "
        f"[bold]tool calls[/] {tools}   "
        f"[bold]prompt tokens from cache[/] {report.cached_share:.1%}"
    )
    errors = [o for o in report.outcomes if o.error]
    if errors:
        console.print(f"[red]{len(errors)} task(s) failed with an error[/], e.g. {errors[0].error}")
