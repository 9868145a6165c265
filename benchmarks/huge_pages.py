"""Weights and KV pool in huge pages against 4 KiB pages, side by side in one process:
two engines on the same checkpoint, one built with `AGENTCPU_HUGE_PAGES=0`, decode in
alternating rounds; prints the medians, the median of the per-round ratios, and the
read-bandwidth probe on both kinds of pages (hardware/huge_pages.py).

    python benchmarks/huge_pages.py --model .bench/qwen2.5-0.5b --quant int4-g32-sym --streams 1 16
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from agentcpu.bench import offline
from agentcpu.engine.llm_engine import LLMEngine
from agentcpu.hardware import huge_pages
from agentcpu.models import loading

PROBE_BYTES = 1 << 30


def anon_huge_kb() -> int:
    """The process's anonymous memory in huge pages (kB), from /proc."""
    with open("/proc/self/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith("AnonHugePages:"))


def engine_with(flag: str, args: argparse.Namespace) -> LLMEngine:
    os.environ[huge_pages.DISABLE_ENV] = flag
    try:
        cfg = loading.resolve_engine_config(
            args.model,
            dtype="bfloat16",
            max_model_len=4096,
            kv_cache_gb=1.0,
            quant=None if args.quant == "bf16" else args.quant,
        )
        return LLMEngine(cfg)
    finally:
        os.environ.pop(huge_pages.DISABLE_ENV)


def probe_pair(rounds: int) -> tuple[float, float]:
    """Best read bandwidth (GB/s) of a torch sum over 1 GiB on 4 KiB and on huge pages."""
    small = torch.ones(PROBE_BYTES // 4)
    huge = huge_pages.zeros((PROBE_BYTES // 4,), torch.float32).fill_(1)
    best = {"small": float("inf"), "huge": float("inf")}
    for _ in range(rounds):
        for name, buffer in (("small", small), ("huge", huge)):
            t0 = time.perf_counter()
            buffer.sum()
            best[name] = min(best[name], time.perf_counter() - t0)
    return PROBE_BYTES / best["small"] / 1e9, PROBE_BYTES / best["huge"] / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--quant", default="int4-g32-sym", help="int8, int4-g32, ... or bf16")
    p.add_argument("--streams", type=int, nargs="+", default=[1])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if not huge_pages.enabled():
        raise SystemExit(f"no transparent huge pages here (mode: {huge_pages.thp_mode()})")
    torch.set_num_threads(args.threads)
    before = anon_huge_kb()
    engines = {"4 KiB": engine_with("0", args)}
    assert anon_huge_kb() == before, "the 4 KiB engine got huge pages"
    engines["2 MiB"] = engine_with("1", args)
    print(f"anonymous huge pages: {(anon_huge_kb() - before) / 1024:.0f} MiB")
    for engine in engines.values():
        offline.decode(engine, 1, 16, 8, 0)  # warm-up
    small_gbs, huge_gbs = probe_pair(args.rounds)
    print(f"read probe: 4 KiB {small_gbs:.1f} GB/s, 2 MiB {huge_gbs:.1f} GB/s")
    print(f"| {args.quant}, {args.threads} threads | 4 KiB tok/s | 2 MiB tok/s | median ratio |")
    print("|---|--:|--:|--:|")
    for streams in args.streams:
        rates: dict[str, list[float]] = {name: [] for name in engines}
        for r in range(args.rounds):
            for name, engine in engines.items():
                rates[name].append(
                    offline.decode(engine, streams, 16, args.output_len, r)["decode_tok_s"]
                )
        ratios = [h / s for h, s in zip(rates["2 MiB"], rates["4 KiB"], strict=True)]
        print(
            f"| {streams} stream{'s' * (streams > 1)} (median of {args.rounds}) "
            f"| {statistics.median(rates['4 KiB']):.1f} | {statistics.median(rates['2 MiB']):.1f} "
            f"| {statistics.median(ratios):.3f} |"
        )


if __name__ == "__main__":
    main()
