"""Write seeded demo-agent conversations (OpenAI message form) as JSONL.

    python scripts/make_demo_data.py --seed 1 --count 150000 --out .runs/demo_train.jsonl

Each line: {"kind": ..., "messages": [system, user, (assistant tool_calls, tool...)*,
assistant]}. The tools are always `agentcpu.demo.tools.TOOL_SCHEMAS`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agentcpu.demo.tasks import generate_task, task_messages


def write_conversations(seed: int, count: int, out: Path) -> None:
    rng = random.Random(seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as handle:
        for _ in range(count):
            task = generate_task(rng)
            record = {"kind": task.kind, "messages": task_messages(task)}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--count", type=int, default=150_000)
    parser.add_argument("--out", type=Path, default=Path(".runs/demo_train.jsonl"))
    args = parser.parse_args()
    write_conversations(args.seed, args.count, args.out)
    print(f"wrote {args.count} conversations to {args.out}")


if __name__ == "__main__":
    main()
