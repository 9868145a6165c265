"""Evaluate the demo model end to end: the real server, the `openai` client, real tools.

    python scripts/eval_demo_served.py --count 200 --seed 12345 --json-out eval.json

Starts `agentcpu serve` on the embedded model (or `--model DIR`; or uses `--base-url`),
then runs held-out tasks (a seed the training data never used) as client-side agents,
many at once: chat completion with the demo tools -> run the calls locally -> append the
results -> again, until a reply without calls. Two passes: tool calls grammar-constrained
(the server's default) and unconstrained (`constrain_tool_calls: false`, an agentcpu
extension), which measures the model's own JSON. Success means the final reply contains
the expected value and the task used exactly the tools it needs; a call is valid when it
parsed into a known tool with JSON-object arguments (unparsed `<tool_call>` text that the
server left in the content counts as an invalid call).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agentcpu.demo.tasks import SYSTEM_PROMPT, TOOL_SCHEMAS, Task, check_answer, generate_tasks  # noqa: E402
from agentcpu.demo.tools import TOOL_FUNCTIONS, run_tool, tool_result_text  # noqa: E402

MAX_ROUNDS = 4
MAX_TOKENS = 160
START_TIMEOUT_S = 120


async def run_task(client, model: str, task: Task, constrain: bool) -> dict:
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": task.user}]
    calls = invalid = 0
    names: list[str] = []
    for _ in range(MAX_ROUNDS):
        reply = await client.chat.completions.create(
            model=model, messages=messages, tools=TOOL_SCHEMAS, temperature=0,
            max_tokens=MAX_TOKENS, extra_body={"constrain_tool_calls": constrain})
        message = reply.choices[0].message
        leftover = (message.content or "").count("<tool_call>")
        calls, invalid = calls + leftover, invalid + leftover
        good = []
        for call in message.tool_calls or []:
            calls += 1
            try:
                arguments = json.loads(call.function.arguments)
            except json.JSONDecodeError:
                arguments = None
            if call.function.name not in TOOL_FUNCTIONS or not isinstance(arguments, dict):
                invalid += 1
                continue
            good.append((call, arguments))
        if not message.tool_calls:
            return {"final": message.content or "", "calls": calls, "invalid": invalid, "names": names}
        messages.append({"role": "assistant", "content": message.content, "tool_calls": [
            {"id": c.id, "type": "function",
             "function": {"name": c.function.name, "arguments": c.function.arguments}}
            for c in message.tool_calls]})
        for call, arguments in good:
            names.append(call.function.name)
            messages.append({"role": "tool", "tool_call_id": call.id,
                             "content": tool_result_text(run_tool(call.function.name, arguments))})
    return {"final": "", "calls": calls, "invalid": invalid, "names": names}


def succeeded(task: Task, result: dict) -> bool:
    needed = sorted(c.name for round_ in task.rounds for c in round_)
    return (check_answer(task, result["final"]) and result["invalid"] == 0
            and sorted(result["names"]) == needed)


async def evaluate(base_url: str, model: str, tasks: list[Task], constrain: bool,
                   concurrency: int) -> tuple[dict, list]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    slots = asyncio.Semaphore(concurrency)

    async def one(task: Task) -> dict:
        async with slots:
            return await run_task(client, model, task, constrain)

    started = time.monotonic()
    results = await asyncio.gather(*(one(t) for t in tasks))
    seconds = time.monotonic() - started
    await client.close()
    kinds, wins = Counter(), Counter()
    for task, result in zip(tasks, results, strict=True):
        kinds[task.kind] += 1
        wins[task.kind] += succeeded(task, result)
    calls = sum(r["calls"] for r in results)
    invalid = sum(r["invalid"] for r in results)
    report = {"constrained": constrain, "tasks": len(tasks),
              "success_rate": sum(wins.values()) / len(tasks), "tool_calls": calls,
              "valid_tool_call_rate": 1 - invalid / max(1, calls), "seconds": round(seconds, 1),
              "per_kind": {k: f"{wins[k]}/{n}" for k, n in sorted(kinds.items())}}
    failures = [(t, r) for t, r in zip(tasks, results, strict=True) if not succeeded(t, r)]
    return report, failures


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str | None, threads: int | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "agentcpu.cli", "serve", "--port", str(port),
               "--log-level", "warning", "--response-store-dir", ""]
    if model:
        command += ["--model", model]
    if threads:
        command += ["--threads", str(threads)]
    server = subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    import urllib.request

    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with status {server.returncode}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2):
                return server, base + "/v1"
        except OSError:
            time.sleep(0.5)
    server.terminate()
    raise SystemExit("the server did not start in time")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default=None, help="an already running server's /v1 URL")
    parser.add_argument("--model", default=None, help="model directory (default: the embedded one)")
    parser.add_argument("--served-model", default="default")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--show-failures", type=int, default=8)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    server = None
    base_url = args.base_url
    if base_url is None:
        server, base_url = start_server(args.model, args.threads)
    try:
        tasks = generate_tasks(args.seed, args.count)
        reports = []
        for constrain in (True, False):
            report, failures = asyncio.run(
                evaluate(base_url, args.served_model, tasks, constrain, args.concurrency))
            reports.append(report)
            for task, result in failures[: args.show_failures]:
                print(f"FAIL [{task.kind}] {task.user!r} expected {task.expected!r}"
                      f" got {result['final']!r} tools {result['names']}")
            print(json.dumps(report, indent=2), flush=True)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    if args.json_out:
        args.json_out.write_text(json.dumps(reports, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
