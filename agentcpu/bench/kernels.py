"""Our linear kernels (weight-only int8 / int4; bf16 on AVX-512 BF16 and AVX2) against
bf16 / fp32 F.linear and the bandwidth roofline, on the Qwen2.5-0.5B layer shapes
(docs/quantization.md and docs/kernels.md record the tables).

    agentcpu bench kernel [--batches 1 8 32] [--shapes qkv o gate_up down]
        [--rounds 31] [--threads N] [--compile] [--working-set-mb 256] [--json out.json]

(`python benchmarks/kernels.py` before session 12.)

Every method of one (shape, batch) is timed round-robin (A B C A B C ...) so machine
drift hits all alike; each figure is the median (and the best) over rounds of the mean
time of the calls in one round (about 0.5 ms of calls, so a preempted round is one
outlier on a shared machine). Each call reads another copy of the weights, cycling
through --working-set-mb of them, so weights stream from DRAM as in a decode step
rather than from the last-level cache. GB/s = bytes of the weights as stored
(quantized bytes and scales for int8 / int4) / time; "% bw" is that over the read
bandwidth measured in the same run; "x bf16" and "x fp32" are (F.linear time) /
(method time): above 1 is faster.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from agentcpu.hardware.probe import measure_read_bandwidth
from agentcpu.layers.amx_kernel import amx_shape_ok, built_amx_kernel
from agentcpu.layers.bf16_kernel import bf16_dot_kernel, bf16_kernel, bf16_packed_kernel
from agentcpu.layers.packed_linear import pack_weight
from agentcpu.quant import formats
from agentcpu.quant.kernels import kernels

# (in_features, out_features, name) of one Qwen2.5-0.5B decoder layer
SHAPES = [(896, 1152, "qkv"), (896, 896, "o"), (896, 9728, "gate_up"), (4864, 896, "down")]
DEFAULT_WORKING_SET_MB = 256
TARGET_ROUND_S = 0.0005  # calls per round: short, so a preempted round is one outlier


def _calls_per_round(fn: Callable[[], object]) -> int:
    t0 = time.perf_counter()
    fn()
    return max(1, min(200, int(TARGET_ROUND_S / max(time.perf_counter() - t0, 1e-7))))


def time_round_robin(
    fns: dict[str, Callable[[], object]], rounds: int
) -> dict[str, tuple[float, float]]:
    """(median, best) seconds per call of each function."""
    for fn in fns.values():  # warm-up (oneDNN primitives, compiled graphs, page faults)
        fn()
        fn()
    calls = {name: _calls_per_round(fn) for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            samples[name].append((time.perf_counter() - t0) / calls[name])
    return {name: (statistics.median(s), min(s)) for name, s in samples.items()}


def _torch_int4pack(w4: formats.Int4Weight):
    """torch's own int4 format from ours: w = (q - 8) * scale + zero, zero = offset + 8 * scale."""
    q = formats.unpack_int4(w4.qweight).to(torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 2)
    scales = w4.scales.float()
    zeros = w4.offsets.float() + 8 * scales
    scale_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous().bfloat16()
    return packed, scale_zeros


def _compiled_dequant_matmuls():
    @torch.compile(dynamic=False)
    def int8_mm(x, q, s):
        return F.linear(x, q.to(x.dtype)) * s.to(x.dtype)

    @torch.compile(dynamic=False)
    def int4_mm(x, packed, scales, offsets):
        n, half = packed.shape
        blocks = packed.reshape(n, half * 2 // 32, 1, 16)
        q = torch.cat([blocks & 15, blocks >> 4], dim=2).reshape(n, scales.shape[1], -1)
        w = q.to(torch.float32) * scales.float().unsqueeze(-1) + offsets.float().unsqueeze(-1)
        return F.linear(x, w.reshape(n, -1).to(x.dtype))

    return int8_mm, int4_mm


def _rotating(call: Callable[..., object], weights: tuple[torch.Tensor, ...], working_set: int):
    """`call(*weights)` on a fresh copy of the weights each time, cycling through enough
    copies to fill `working_set` bytes: a model's layers do not fit the last-level cache,
    so neither may one layer benchmarked over and over."""
    nbytes = sum(t.numel() * t.element_size() for t in weights)
    copies = [weights] + [tuple(t.clone() for t in weights) for _ in range(working_set // nbytes)]
    cycle = itertools.cycle(copies)
    return (lambda: call(*next(cycle))), nbytes


def _methods(k_in, n_out, batch, with_compile, working_set):
    torch.manual_seed(0)
    w = torch.randn(n_out, k_in) * 0.05
    x = torch.randn(batch, k_in)
    xb = x.bfloat16()
    w8 = formats.quantize_int8(w)
    w4 = formats.quantize_int4(w, 128)
    w4g32 = formats.quantize_int4(w, 32)
    packed, scale_zeros = _torch_int4pack(w4)
    s8b = w8.scales.squeeze(1).bfloat16()
    int8_args, int4_args = (w8.qweight, w8.scales), (w4.qweight, w4.scales, w4.offsets)
    int4g32_args = (w4g32.qweight, w4g32.scales, w4g32.offsets)
    methods = {
        "bf16 F.linear": (lambda w: F.linear(xb, w), (w.bfloat16(),)),
        "fp32 F.linear": (lambda w: F.linear(x, w), (w,)),
        "torch._weight_int8pack_mm": (
            lambda q, s: torch._weight_int8pack_mm(xb, q, s),
            (w8.qweight, s8b),
        ),
        "torch._weight_int4pack_mm_for_cpu g128": (
            lambda q, sz: torch._weight_int4pack_mm_for_cpu(xb, q, 128, sz),
            (packed, scale_zeros),
        ),
    }
    k = kernels()
    if k is not None:
        methods |= {
            "ours int8 gemv": (lambda q, s: k.int8_linear_gemv(xb, q, s, None), int8_args),
            "ours int8 tiled": (lambda q, s: k.int8_linear_tiled(xb, q, s, None, False), int8_args),
            "ours int4 g128 gemv": (
                lambda q, s, m: k.int4_linear_gemv(xb, q, s, m, None),
                int4_args,
            ),
            "ours int4 g128 tiled": (
                lambda q, s, m: k.int4_linear_tiled(xb, q, s, m, None, False),
                int4_args,
            ),
            "ours int4 g32 gemv": (
                lambda q, s, m: k.int4_linear_gemv(xb, q, s, m, None),
                int4g32_args,
            ),
        }
        if k.int8_vnni_available() and n_out % formats.PANEL_ROWS == 0 and k_in % 32 == 0:
            methods["ours int8 VNNI panels"] = (
                lambda p, s: k.int8_linear_vnni(xb, p, s, None),
                (formats.int8_panels(w8), w8.scales),
            )
    if (dot := bf16_dot_kernel()) is not None:
        methods["ours bf16 dot (AVX-512 BF16)"] = (
            lambda w: dot.bf16_dot_linear(xb, w, None),
            (w.bfloat16(),),
        )
    if (amx := built_amx_kernel()) is not None and amx_shape_ok(w.shape):
        methods["ours bf16 AMX tiles"] = (
            lambda w: amx.amx_bf16_linear(xb, w, None),
            (w.bfloat16(),),
        )
    if (packed_k := bf16_packed_kernel()) is not None and n_out % 16 == 0 and k_in % 2 == 0:
        methods["ours bf16 packed"] = (
            lambda p: packed_k.bf16_packed_linear(xb, p, None),
            (pack_weight(w.bfloat16()),),
        )
    if (small := bf16_kernel()) is not None and batch <= 64:
        methods["ours bf16 small-batch (AVX2)"] = (
            lambda w: small.bf16_linear_small_batch(xb, w, None),
            (w.bfloat16(),),
        )
    if with_compile:
        int8_mm, int4_mm = _compiled_dequant_matmuls()
        methods |= {
            "torch.compile int8 dequant+mm": (
                lambda q, s: int8_mm(xb, q, s),
                (w8.qweight, w8.scales.squeeze(1)),
            ),
            "torch.compile int4 g128 dequant+mm": (lambda q, s, m: int4_mm(xb, q, s, m), int4_args),
        }
    return {
        name: _rotating(call, weights, working_set) for name, (call, weights) in methods.items()
    }


def run(batches, rounds, with_compile, working_set, shapes=None) -> tuple[float, list[dict]]:
    bandwidth = measure_read_bandwidth()
    rows = []
    for k_in, n_out, name in SHAPES:
        if shapes and name not in shapes:
            continue
        for batch in batches:
            methods = _methods(k_in, n_out, batch, with_compile, working_set)
            times = time_round_robin({m: fn for m, (fn, _) in methods.items()}, rounds)
            for method, (_, nbytes) in methods.items():
                median, best = times[method]
                gbps = nbytes / median / 1e9
                rows.append(
                    dict(
                        shape=f"{name} {k_in}->{n_out}",
                        batch=batch,
                        method=method,
                        us=median * 1e6,
                        best_us=best * 1e6,
                        weight_bytes=nbytes,
                        gbps=gbps,
                        pct_bw=100 * gbps / bandwidth,
                        best_pct_bw=100 * nbytes / best / 1e9 / bandwidth,
                        x_bf16=times["bf16 F.linear"][0] / median,
                        x_fp32=times["fp32 F.linear"][0] / median,
                    )
                )
            print(f"done {name} batch {batch}", flush=True)
    return bandwidth, rows


def markdown(bandwidth: float, rows: list[dict]) -> str:
    lines = [
        f"read bandwidth {bandwidth:.1f} GB/s, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "",
        "| shape | batch | method | µs (median) | µs (best) | GB/s | % bw | % bw (best) | x bf16 | x fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['batch']} | {r['method']} | {r['us']:.0f} | {r['best_us']:.0f} "
            f"| {r['gbps']:.1f} | {r['pct_bw']:.0f} | {r['best_pct_bw']:.0f} | {r['x_bf16']:.2f} "
            f"| {r['x_fp32']:.2f} |"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--shapes", nargs="+", choices=[s[2] for s in SHAPES], help="default: all")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument(
        "--compile", action="store_true", help="also time torch.compile'd dequant+mm"
    )
    parser.add_argument("--json", help="write the rows here as JSON")
    parser.add_argument(
        "--working-set-mb",
        type=int,
        default=DEFAULT_WORKING_SET_MB,
        help="weight copies cycled per method (keep it well above the L3 size)",
    )


def run_command(args: argparse.Namespace) -> int:
    """`agentcpu bench kernel`: time every method of every (shape, batch), print the table."""
    if args.threads:
        torch.set_num_threads(args.threads)
    bandwidth, rows = run(
        args.batches, args.rounds, args.compile, args.working_set_mb << 20, args.shapes
    )
    print(markdown(bandwidth, rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(bandwidth_gbps=bandwidth, threads=torch.get_num_threads(), rows=rows),
                f,
                indent=1,
            )
    return 0
