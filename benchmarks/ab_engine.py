"""Engine A/B in one process: one feature off against on, on a random-weight checkpoint.

    python benchmarks/ab_engine.py [--feature packed-layers | prefill-attention]
        [--model .bench/qwen2.5-0.5b] [--streams 1 4 16 32 64] [--prefill 512]
        [--follow-up 2000x300] [--rounds 3]

Features:
- `packed-layers`: bf16 linears packed at load (`layers/packed_linear.py`) against the
  plain layers (`dense_linear`);
- `prefill-attention`: the compiled prefill attention (`layers/fused_ops.py`) against
  PyTorch's SDPA over the gathered context.

Each round builds the engine with the feature off, then on, and runs the same offline
workloads (`agentcpu.bench.offline`): aggregate decode tok/s at each number of streams
with 128-token prompts, prefills of fresh prompts, and follow-up turns (`CxN`: N new
tokens after a cached C-token context, the agent case; tok/s of the N). Rounds
alternate so machine drift hits both. Prints one line per engine per round and the
medians. docs/kernels.md records the results per machine.
"""

from __future__ import annotations

import argparse
import gc
import statistics
from collections.abc import Callable
from contextlib import nullcontext
from unittest import mock

from agentcpu.bench import offline
from agentcpu.engine.llm_engine import LLMEngine
from agentcpu.layers import attention
from agentcpu.models import loading

# feature -> (module, attribute, what it is replaced with to turn the feature off)
FEATURES: dict[str, tuple[object, str, Callable]] = {
    "packed-layers": (loading, "pack_linears", lambda model: 0),
    "prefill-attention": (attention, "prefill_attention_kernel", lambda: None),
}


def feature(name: str, on: bool):
    """A context in which the feature is on (as shipped) or off (patched out)."""
    module, attribute, off = FEATURES[name]
    return nullcontext() if on else mock.patch.object(module, attribute, off)


def build(model: str) -> LLMEngine:
    cfg = loading.resolve_engine_config(
        model, dtype="bfloat16", max_model_len=4096, kv_cache_gb=2.0
    )
    return LLMEngine(cfg)


def measure(
    engine: LLMEngine, streams: list[int], prefill: list[int], follow_ups: list[tuple[int, int]]
) -> dict[str, float]:
    offline.decode(engine, 2, 16, 4, 0)  # warm-up: kernels built, buffers grown
    out = {}
    for s in streams:
        out[f"{s} streams"] = offline.decode(engine, s, 128, 64 if s == 1 else 32, 1)[
            "decode_tok_s"
        ]
    for n in prefill:
        out[f"prefill {n}"] = offline.prefill(engine, n, 2)["prefill_tok_s"]
    for context, new in follow_ups:
        out[f"{context}+{new}"] = offline.follow_up(engine, context, new, 3)["new_tok_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--feature", choices=sorted(FEATURES), default="packed-layers")
    ap.add_argument("--model", default=".bench/qwen2.5-0.5b")
    ap.add_argument("--streams", type=int, nargs="*", default=[1, 4, 16, 32, 64])
    ap.add_argument("--prefill", type=int, nargs="*", default=[512])
    ap.add_argument("--follow-up", nargs="*", default=[], metavar="CxN", help="e.g. 2000x300")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    follow_ups = [tuple(int(n) for n in f.split("x")) for f in args.follow_up]
    results: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    for r in range(args.rounds):
        for on in (False, True):
            with feature(args.feature, on):
                engine = build(args.model)
                row = measure(engine, args.streams, args.prefill, follow_ups)
            results[on].append(row)
            label = "on " if on else "off"
            print(
                f"round {r} {label} " + " | ".join(f"{k}: {v:.1f}" for k, v in row.items()),
                flush=True,
            )
            del engine
            gc.collect()
    print(f"medians (tok/s), {args.feature}: off -> on")
    for key in results[False][0]:
        a = statistics.median(row[key] for row in results[False])
        b = statistics.median(row[key] for row in results[True])
        print(f"  {key:>12}: {a:7.1f} -> {b:7.1f}  ({b / a:.2f}x)")


if __name__ == "__main__":
    main()
