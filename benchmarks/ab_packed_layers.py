"""Engine A/B in one process: bf16 linears packed at load (`layers/packed_linear.py`)
against the plain layers (`dense_linear`), on a random-weight checkpoint.

    python benchmarks/ab_packed_layers.py [--model .bench/qwen2.5-0.5b]
        [--streams 1 4 16 32 64] [--prefill 512] [--rounds 3]

Each round builds the plain engine, then the packed one, and runs the same offline
workloads (`agentcpu.bench.offline`: aggregate decode tok/s at each number of streams
with 128-token prompts, then one prefill); rounds alternate so machine drift hits both.
Prints one line per engine per round and the medians. docs/kernels.md records the
results per machine.
"""

from __future__ import annotations

import argparse
import gc
import statistics

from agentcpu.bench import offline
from agentcpu.engine.llm_engine import LLMEngine
from agentcpu.models import loading


def build(model: str, packed: bool, pack=loading.pack_linears) -> LLMEngine:
    loading.pack_linears = pack if packed else (lambda m: 0)
    try:
        cfg = loading.resolve_engine_config(
            model, dtype="bfloat16", max_model_len=4096, kv_cache_gb=2.0
        )
        return LLMEngine(cfg)
    finally:
        loading.pack_linears = pack


def measure(engine: LLMEngine, streams: list[int], prefill: list[int]) -> dict[str, float]:
    offline.decode(engine, 2, 16, 4, 0)  # warm-up: kernels built, buffers grown
    out = {}
    for s in streams:
        out[f"{s} streams"] = offline.decode(engine, s, 128, 64 if s == 1 else 32, 1)["decode_tok_s"]
    for n in prefill:
        out[f"prefill {n}"] = offline.prefill(engine, n, 2)["prefill_tok_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=".bench/qwen2.5-0.5b")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16, 32, 64])
    ap.add_argument("--prefill", type=int, nargs="*", default=[512])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    results: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    for r in range(args.rounds):
        for packed in (False, True):
            engine = build(args.model, packed)
            row = measure(engine, args.streams, args.prefill)
            results[packed].append(row)
            label = "packed" if packed else "plain "
            print(f"round {r} {label} " + " | ".join(f"{k}: {v:.1f}" for k, v in row.items()), flush=True)
            del engine
            gc.collect()
    print("medians (tok/s): plain -> packed")
    for key in results[False][0]:
        a = statistics.median(row[key] for row in results[False])
        b = statistics.median(row[key] for row in results[True])
        print(f"  {key:>12}: {a:7.1f} -> {b:7.1f}  ({b / a:.2f}x)")


if __name__ == "__main__":
    main()
