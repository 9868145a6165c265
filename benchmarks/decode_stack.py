"""The native decode stack against the modules, side by side in one process: the same
engine decodes with `AGENTCPU_DECODE_STACK` on and off, alternating rounds, and the
medians are printed with their ratio (models/decode_stack.py).

    python benchmarks/decode_stack.py --model .bench/qwen2.5-0.5b --quant int4-g32 --streams 1 16
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from agentcpu.bench import offline
from agentcpu.engine.llm_engine import LLMEngine
from agentcpu.models import decode_stack, loading


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--quant", default="int4-g32", help="int8, int4-g32, ... or bf16")
    p.add_argument("--streams", type=int, nargs="+", default=[1])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    quant = None if args.quant == "bf16" else args.quant
    cfg = loading.resolve_engine_config(
        args.model, dtype="bfloat16", max_model_len=4096, kv_cache_gb=1.0, quant=quant
    )
    engine = LLMEngine(cfg)
    offline.decode(engine, 1, 16, 8, 0)  # warm-up, builds the stack
    if engine.model._stack is None:
        raise SystemExit("no decode stack on this machine (no compiled kernels)")
    print(
        f"| {args.quant}, {args.threads} threads | modules tok/s | stack tok/s | stack / modules |"
    )
    print("|---|--:|--:|--:|")
    for streams in args.streams:
        rates: dict[str, list[float]] = {"0": [], "1": []}
        for r in range(args.rounds):
            for flag in rates:
                os.environ[decode_stack.DISABLE_ENV] = flag
                engine.model.reset_decode_stack()
                run = offline.decode(engine, streams, 16, args.output_len, r)
                rates[flag].append(run["decode_tok_s"])
        off, on = statistics.median(rates["0"]), statistics.median(rates["1"])
        print(
            f"| {streams} stream{'s' * (streams > 1)} (median of {args.rounds}) "
            f"| {off:.1f} | {on:.1f} | {on / off:.3f} |"
        )


if __name__ == "__main__":
    main()
