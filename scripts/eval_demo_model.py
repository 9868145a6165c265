"""Evaluate the demo model as an agent on held-out tasks (a seed the training data never used).

    python scripts/eval_demo_model.py --model agentcpu/assets/demo-model --count 200 --seed 12345

Greedy-decodes each task, running the real tools: parse every <tool_call> JSON, run it,
append the <tool_response>, and decode again, until the model answers without a tool call.
Reports task success (final answer right, tools used exactly when the task needs them)
and the share of tool calls that were valid JSON naming a real tool. Uses transformers
(a dev tool; the server never imports it).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agentcpu.demo.chat_format import render_chat  # noqa: E402
from agentcpu.demo.tasks import (  # noqa: E402
    SYSTEM_PROMPT,
    TOOL_SCHEMAS,
    Task,
    check_answer,
    generate_tasks,
)
from agentcpu.demo.tools import TOOL_FUNCTIONS, run_tool, tool_result_text  # noqa: E402

TOOL_CALL_PATTERN = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
MAX_ROUNDS = 4
MAX_NEW_TOKENS = 160


def parse_tool_calls(text: str) -> tuple[list[dict], int]:
    """(valid calls, number of invalid ones) from an assistant turn in Hermes format."""
    calls, invalid = [], 0
    for raw in TOOL_CALL_PATTERN.findall(text):
        try:
            call = json.loads(raw)
        except json.JSONDecodeError:
            invalid += 1
            continue
        if (not isinstance(call, dict) or call.get("name") not in TOOL_FUNCTIONS
                or not isinstance(call.get("arguments"), dict)):
            invalid += 1
            continue
        calls.append(call)
    if text.count("<tool_call>") > len(calls) + invalid:
        invalid += text.count("<tool_call>") - len(calls) - invalid  # unterminated call
    return calls, invalid


class Agent:
    def __init__(self, model_dir: Path, threads: int):
        from tokenizers import Tokenizer
        from transformers import LlamaForCausalLM

        torch.set_num_threads(threads)
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
        generation = json.loads((model_dir / "generation_config.json").read_text())
        self.eos_ids = generation["eos_token_id"]
        self.pad_id = generation["pad_token_id"]

    @torch.inference_mode()
    def complete(self, messages: list[dict]) -> str:
        prompt = render_chat(messages, TOOL_SCHEMAS, add_generation_prompt=True)
        ids = torch.tensor([self.tokenizer.encode(prompt, add_special_tokens=False).ids])
        out = self.model.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                  eos_token_id=self.eos_ids, pad_token_id=self.pad_id)
        new = [t for t in out[0, ids.shape[1]:].tolist() if t not in self.eos_ids]
        return self.tokenizer.decode(new, skip_special_tokens=False)

    def run(self, task: Task) -> dict:
        messages = [{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": task.user}]
        made, invalid, names = 0, 0, []
        for _ in range(MAX_ROUNDS):
            text = self.complete(messages)
            calls, bad = parse_tool_calls(text)
            made, invalid = made + len(calls) + bad, invalid + bad
            if not calls and not bad:
                return {"final": text.strip(), "calls": made, "invalid": invalid, "names": names}
            if not calls:
                break
            first_id = sum(1 for m in messages if m["role"] == "tool")
            messages.append({"role": "assistant", "content": None, "tool_calls": [
                {"id": f"call_{first_id + i}", "type": "function",
                 "function": {"name": c["name"],
                              "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
                for i, c in enumerate(calls)]})
            for i, call in enumerate(calls):
                names.append(call["name"])
                messages.append({"role": "tool", "tool_call_id": f"call_{first_id + i}",
                                 "content": tool_result_text(run_tool(call["name"], call["arguments"]))})
        return {"final": "", "calls": made, "invalid": invalid, "names": names}


def task_succeeded(task: Task, result: dict) -> bool:
    expected_names = sorted(c.name for round_ in task.rounds for c in round_)
    return (check_answer(task, result["final"]) and result["invalid"] == 0
            and sorted(result["names"]) == expected_names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("agentcpu/assets/demo-model"))
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--show-failures", type=int, default=10)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    agent = Agent(args.model, args.threads)
    tasks = generate_tasks(args.seed, args.count)
    started = time.monotonic()
    by_kind, ok_by_kind = Counter(), Counter()
    calls = invalid = 0
    failures = []
    for task in tasks:
        result = agent.run(task)
        ok = task_succeeded(task, result)
        by_kind[task.kind] += 1
        ok_by_kind[task.kind] += ok
        calls, invalid = calls + result["calls"], invalid + result["invalid"]
        if not ok:
            failures.append((task, result))
    success = sum(ok_by_kind.values()) / len(tasks)
    valid = 1.0 - invalid / max(calls, 1)
    report = {"tasks": len(tasks), "success_rate": success, "tool_calls": calls,
              "valid_tool_call_rate": valid, "seconds": round(time.monotonic() - started, 1),
              "per_kind": {k: f"{ok_by_kind[k]}/{n}" for k, n in sorted(by_kind.items())}}
    for task, result in failures[: args.show_failures]:
        print(f"FAIL [{task.kind}] {task.user!r} expected {task.expected!r}"
              f" got {result['final']!r} tools {result['names']}")
    print(json.dumps(report, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
