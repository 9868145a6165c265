"""Where a run's engine time went, from an `AGENTCPU_STEP_LOG` file: steps grouped by
kind (decode-only by batch size, prefill-only and mixed by prefill tokens), with their
share of the busy time and their tokens per second.

    AGENTCPU_STEP_LOG=steps.jsonl agentcpu bench agent ...   # or agentcpu serve ...
    python benchmarks/step_log_summary.py steps.jsonl

docs/architecture.md ("Reading a step log") reads one such table.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

DECODE_BATCHES = ((1, "1"), (4, "2-4"), (8, "5-8"), (16, "9-16"), (32, "17-32"))


def kind(step: dict) -> str:
    if step["prefill"] == 0:
        label = next((name for top, name in DECODE_BATCHES if step["decodes"] <= top), "33+")
        return f"decode-only, {label} streams"
    size = "<256" if step["prefill"] < 256 else "256-511" if step["prefill"] < 512 else "512+"
    return f"{'prefill-only' if step['decodes'] == 0 else 'mixed'}, {size} prefill tokens"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log", help="an AGENTCPU_STEP_LOG file (one JSON object per line)")
    args = parser.parse_args()
    with open(args.log) as f:
        steps = [json.loads(line) for line in f if line.strip()]
    if not steps:
        raise SystemExit(f"{args.log} holds no steps")
    span = steps[-1]["t"] + steps[-1]["s"] - steps[0]["t"]
    busy = sum(s["s"] for s in steps)
    print(f"{len(steps)} steps over {span:.1f} s, busy {busy:.1f} s ({busy / span:.1%})")
    groups: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0])
    for step in steps:
        g = groups[kind(step)]
        g[0] += 1
        g[1] += step["s"]
        g[2] += step["decodes"] + step["prefill"]
    print(f"{'steps':42} {'count':>6} {'seconds':>8} {'share':>7} {'tok/s':>7}")
    for name, (count, seconds, tokens) in sorted(groups.items(), key=lambda kv: -kv[1][1]):
        rate = tokens / seconds if seconds else 0.0
        print(f"{name:42} {count:>6} {seconds:>8.1f} {seconds / busy:>7.1%} {rate:>7.1f}")


if __name__ == "__main__":
    main()
