"""Decode attention (one query token per sequence) over a paged bf16 cache: the compiled
kernel this CPU builds, per layer call, at agent contexts.

    python benchmarks/decode_attention.py [--cases 14x2x3000x16 32x8x3000x16 14x2x1000x1]
        [--rounds 7] [--layers 24] [--kernel auto|avx2]

A case is query heads x KV heads x context tokens x streams (head_dim 64); the context's
blocks are scattered through the pool as in a long-running server. Each round calls the
kernel once per layer, each layer with its own cache (in huge pages, as the engine's
pool), so the KV comes from DRAM as in a model: with one cache reused (`--layers 1`) it
sits in L3 and the same kernel measured 2-3x faster than in the engine (session 24).
Prints the median ms per call, the KV read rate and cycles per key and thread at an
assumed 3.1 GHz (the Zen 3 VMs), so a rewrite can be compared with docs/kernels.md.
`--kernel avx2` runs the AVX2 kernel (`csrc/fused_ops.cpp`, what AVX2-only and AVX-512
without BF16 machines run) where the VDPBF16PS one would be picked.
"""

from __future__ import annotations

import argparse

import torch

from agentcpu.bench.kernels import time_round_robin
from agentcpu.hardware import huge_pages
from agentcpu.layers.attention import decode_attention_op
from agentcpu.layers.fused_ops import fused_for

BLOCK = 16
HEAD_DIM = 64
ASSUMED_HZ = 3.1e9


def _case(heads: int, kv_heads: int, context: int, streams: int, layers: int):
    """q, [(k_cache, v_cache)] one pair per layer, slots, lens."""
    blocks = streams * -(-context // BLOCK)
    pool = torch.randperm(blocks * 2)[:blocks].view(streams, -1)
    slots = (pool[:, :, None] * BLOCK + torch.arange(BLOCK)).reshape(streams, -1)[:, :context]
    shape = (blocks * 2 * BLOCK, kv_heads, HEAD_DIM)
    caches = [
        (
            huge_pages.zeros(shape, torch.bfloat16).normal_(),
            huge_pages.zeros(shape, torch.bfloat16).normal_(),
        )
        for _ in range(layers)
    ]
    q = torch.randn(streams, heads, HEAD_DIM).bfloat16()
    lens = torch.full((streams,), context, dtype=torch.long)
    return q, caches, slots.contiguous(), lens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cases", nargs="+", default=["14x2x3000x16", "32x8x3000x16", "14x2x1000x1"]
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=24, help="caches cycled per round")
    parser.add_argument("--kernel", choices=["auto", "avx2"], default="auto")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for text in args.cases:
        heads, kv_heads, context, streams = (int(x) for x in text.split("x"))
        case = _case(heads, kv_heads, context, streams, args.layers)
        seconds, _best = time_round_robin({"kernel": _kernel_call(case, args.kernel)}, args.rounds)["kernel"]
        seconds /= args.layers
        kv_bytes = streams * context * kv_heads * HEAD_DIM * 2 * 2
        keys_per_thread = streams * kv_heads * context / args.threads
        print(
            f"{text}: {seconds * 1e3:.3f} ms per call, KV {kv_bytes / seconds / 1e9:.1f} GB/s, "
            f"~{seconds * ASSUMED_HZ / keys_per_thread:.0f} cycles per key and thread"
        )


def _kernel_call(case, which: str):
    """The engine's decode attention kernel for this CPU (or the AVX2 one), bound to
    `case`: one call per layer."""
    q, caches, slots, lens = case
    if which == "avx2":
        ops = fused_for(caches[0][0])
        op = None if ops is None else (ops, "decode_attention")
    else:  # VDPBF16PS on AVX-512 BF16
        op = decode_attention_op(q.dtype, q.shape[1], q.shape[-1], caches[0][0])
    if op is None:
        raise SystemExit("no compiled decode attention on this machine")
    kernel = getattr(*op)

    def all_layers():
        for k_cache, v_cache in caches:
            kernel(q, k_cache, v_cache, slots, lens, 0.125)

    return all_layers


if __name__ == "__main__":
    main()
