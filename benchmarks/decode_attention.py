"""Decode attention (one query token per sequence) over a paged bf16 cache: the compiled
kernel this CPU builds, per layer call, at agent contexts.

    python benchmarks/decode_attention.py [--cases 14x2x3000x16 32x8x3000x16 14x2x1000x1]
        [--rounds 7]

A case is query heads x KV heads x context tokens x streams (head_dim 64); the context's
blocks are scattered through the pool as in a long-running server. Prints the median ms
per call, the KV read rate and cycles per key and thread at an assumed 3.1 GHz (the Zen 3
VMs), so a rewrite can be compared with docs/kernels.md ("Decode attention at long
contexts on AVX2").
"""

from __future__ import annotations

import argparse

import torch

from agentcpu.bench.kernels import time_round_robin
from agentcpu.layers.attention import decode_attention_op

BLOCK = 16
HEAD_DIM = 64
ASSUMED_HZ = 3.1e9


def _case(heads: int, kv_heads: int, context: int, streams: int):
    blocks = streams * -(-context // BLOCK)
    pool = torch.randperm(blocks * 2)[:blocks].view(streams, -1)
    slots = (pool[:, :, None] * BLOCK + torch.arange(BLOCK)).reshape(streams, -1)[:, :context]
    k_cache = torch.randn(blocks * 2 * BLOCK, kv_heads, HEAD_DIM).bfloat16()
    v_cache = torch.randn(blocks * 2 * BLOCK, kv_heads, HEAD_DIM).bfloat16()
    q = torch.randn(streams, heads, HEAD_DIM).bfloat16()
    lens = torch.full((streams,), context, dtype=torch.long)
    return q, k_cache, v_cache, slots.contiguous(), lens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cases", nargs="+", default=["14x2x3000x16", "32x8x3000x16", "14x2x1000x1"]
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for text in args.cases:
        heads, kv_heads, context, streams = (int(x) for x in text.split("x"))
        case = _case(heads, kv_heads, context, streams)
        seconds, _best = time_round_robin({"kernel": _kernel_call(case)}, args.rounds)["kernel"]
        kv_bytes = streams * context * kv_heads * HEAD_DIM * 2 * 2
        keys_per_thread = streams * kv_heads * context / args.threads
        print(
            f"{text}: {seconds * 1e3:.3f} ms per call, KV {kv_bytes / seconds / 1e9:.1f} GB/s, "
            f"~{seconds * ASSUMED_HZ / keys_per_thread:.0f} cycles per key and thread"
        )


def _kernel_call(case):
    """The engine's decode attention kernel for this CPU, bound to `case`."""
    q, k_cache, v_cache, slots, lens = case
    op = decode_attention_op(q.dtype, q.shape[1], q.shape[-1], k_cache)  # VDPBF16PS on AVX-512 BF16
    if op is None:
        raise SystemExit("no compiled decode attention on this machine")
    kernel = getattr(*op)
    return lambda: kernel(q, k_cache, v_cache, slots, lens, 0.125)

if __name__ == "__main__":
    main()
