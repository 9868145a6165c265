"""The packed bf16 linear on AMX tiles against its VDPBF16PS tile and oneDNN, by rows.

Sets `bf16_packed_amx_min_rows` per measurement (1: tiles, huge: vector tile) in one
process, alternating the methods round by round, with the weight rotated through copies
well past the L2 (`--working-set-mb`) so every call reads it from memory as a decode step
does. Prints GB/s (weight bytes / time) and TFLOPS per method, rows and shape; the median
of `--rounds`. Used to set the default row threshold (docs/kernels.md, "AMX").

    python benchmarks/packed_amx_crossover.py --rows 1 2 4 8 16 32 64 512
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from agentcpu.layers.bf16_kernel import bf16_packed_kernel
from agentcpu.layers.packed_linear import pack_weight

SHAPES = {"qkv": (1152, 896), "o": (896, 896), "gate_up": (9728, 896), "down": (896, 4864)}
NEVER = 1 << 40


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 512])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--working-set-mb", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernel = bf16_packed_kernel()
    if kernel is None or kernel.bf16_packed_amx_min_rows(-1) < 0:
        raise SystemExit("needs the packed kernel built with AMX (a CPU with AMX-BF16)")
    default = kernel.bf16_packed_amx_min_rows(-1)
    print(f"default threshold: {default} rows; {args.threads} threads")
    print("| shape | rows | AMX tiles | VDPBF16PS tile | oneDNN F.linear | AMX / VDPBF16PS |")
    print("|---|---|---|---|---|---|")
    try:
        for name in args.shapes:
            n, k = SHAPES[name]
            copies = max(2, args.working_set_mb * 2**20 // (n * k * 2))
            weights = [torch.randn(n, k).bfloat16() for _ in range(copies)]
            packed = [pack_weight(w) for w in weights]
            for rows in args.rows:
                x = torch.randn(rows, k).bfloat16()
                calls = {
                    "amx": lambda i: kernel.bf16_packed_linear(x, packed[i], None),
                    "vdp": lambda i: kernel.bf16_packed_linear(x, packed[i], None),
                    "onednn": lambda i: F.linear(x, weights[i]),
                }
                times: dict[str, list[float]] = {m: [] for m in calls}
                for _ in range(args.rounds):
                    for method, call in calls.items():
                        kernel.bf16_packed_amx_min_rows(1 if method == "amx" else NEVER)
                        call(0)
                        start = time.perf_counter()
                        for i in range(copies):
                            call(i)
                        times[method].append((time.perf_counter() - start) / copies)
                med = {m: statistics.median(v) for m, v in times.items()}
                cells = [_cell(med[m], rows, n, k) for m in calls]
                print(f"| {name} {k}->{n} | {rows} | " + " | ".join(cells)
                      + f" | {med['vdp'] / med['amx']:.2f}x |", flush=True)
    finally:
        kernel.bf16_packed_amx_min_rows(default)


def _cell(seconds: float, rows: int, n: int, k: int) -> str:
    gbs = n * k * 2 / seconds / 1e9
    tflops = 2 * rows * n * k / seconds / 1e12
    return f"{seconds * 1e6:.0f} µs, {gbs:.1f} GB/s, {tflops:.2f} TF"


if __name__ == "__main__":
    main()
