"""Prefill attention: our compiled kernel (AVX-512 BF16 or AVX2, whichever this CPU
builds) against the PyTorch path the engine takes without it (SDPA with the
offset-causal mask over the gathered context), on Qwen2.5-0.5B heads (14 query heads,
2 KV heads, head_dim 64) and a bf16 paged cache with scattered blocks.

    python benchmarks/attention.py [--shapes 300x2300 512x2048 512x512] [--rounds 9]
        [--heads 14 2 64] [--threads N]

Shapes are queries x context (the chunk included): a follow-up agent turn is a few
hundred queries over thousands of cached keys, a fresh prompt has queries = context.
Both methods are timed round-robin (`agentcpu bench kernel`'s timer: machine drift hits both
alike); GFLOPS count the causal products actually needed (4 x D per visible query-key
pair), so both methods are scored on the same work. docs/kernels.md records the tables.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch

from agentcpu.bench.kernels import time_round_robin
from agentcpu.layers.attention import PrefillChunk, _prefill
from agentcpu.layers.fused_ops import prefill_attention_kernel

BLOCK = 16  # the engine's KV block size


def _case(queries: int, context: int, heads: int, kv_heads: int, dim: int):
    """A paged cache whose context blocks are scattered through the pool."""
    blocks = (context + BLOCK - 1) // BLOCK
    pool = torch.randperm(blocks * 2)[:blocks]
    slots = (pool[:, None] * BLOCK + torch.arange(BLOCK)).flatten()[:context]
    k_cache = torch.randn(blocks * 2 * BLOCK, kv_heads, dim).bfloat16()
    v_cache = torch.randn(blocks * 2 * BLOCK, kv_heads, dim).bfloat16()
    q = torch.randn(queries, heads, dim).bfloat16()
    return q, k_cache, v_cache, slots


def run(shapes, heads, kv_heads, dim, rounds) -> list[dict]:
    kernel = prefill_attention_kernel()
    if kernel is None:
        raise SystemExit("no compiled prefill attention on this CPU (needs AVX2 or AVX-512 BF16)")
    rows = []
    for queries, context in shapes:
        q, k_cache, v_cache, slots = _case(queries, context, heads, kv_heads, dim)
        scale = dim**-0.5
        own = slots[-queries:]
        chunk = PrefillChunk(0, queries, context, slots if context > queries else None)
        k, v = k_cache[own], v_cache[own]
        fns = {
            "sdpa": partial(_prefill, q, k, v, k_cache, v_cache, chunk, scale),
            "ours": partial(kernel.prefill_attention, q, k_cache, v_cache, slots, scale),
        }
        times = time_round_robin(fns, rounds)
        pairs = sum(context - queries + i + 1 for i in range(queries))
        flops = 4 * dim * heads * pairs
        row = {"queries": queries, "context": context}
        for name, (median, _best) in times.items():
            row[f"{name}_ms"] = median * 1e3
            row[f"{name}_gflops"] = flops / median / 1e9
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["300x2300", "512x2048", "512x512"])
    parser.add_argument(
        "--heads", type=int, nargs=3, default=[14, 2, 64], metavar=("H", "KVH", "D")
    )
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes]
    rows = run(shapes, *args.heads, args.rounds)
    print(f"threads {torch.get_num_threads()}, heads {args.heads}, median of {args.rounds} rounds")
    print("| queries x keys | SDPA ms | ours ms | SDPA GFLOPS | ours GFLOPS | ours / SDPA |")
    print("|---|--:|--:|--:|--:|--:|")
    for r in rows:
        print(
            f"| {r['queries']} x {r['context']:,} | {r['sdpa_ms']:.1f} | {r['ours_ms']:.1f} | "
            f"{r['sdpa_gflops']:.0f} | {r['ours_gflops']:.0f} | {r['sdpa_ms'] / r['ours_ms']:.2f}x |"
        )


if __name__ == "__main__":
    main()
