"""`agentcpu bench serve` (load any OpenAI-compatible endpoint) and `agentcpu bench
compare` (agentcpu, vLLM-CPU and llama.cpp side by side, one at a time).

    agentcpu bench serve --base-url http://127.0.0.1:8000 --workload agent --out DIR
    agentcpu bench serve --workload my.yaml --set concurrency=[1,4] --set output_len=64
    agentcpu bench compare --workload concurrency --shape qwen2.5-0.5b --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
from pathlib import Path

from agentcpu.bench.loadgen import (
    DEFAULT_BASE_URL,
    REQUEST_TIMEOUT_S,
    Limits,
    ServerCaps,
    run_level,
)
from agentcpu.bench.workloads import BUILTIN, level_seed, load_workload, parse_overrides

DEFAULT_MAX_DURATION_S = 1800.0  # per load level
DEFAULT_KV_CACHE_GIB = 4.0
BENCH_DIR = Path(".bench")


def _add_workload_arguments(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument("--workload", required=default is None, default=default, metavar="NAME|FILE",
                        help=f"built-in ({', '.join(BUILTIN)}) or a YAML/JSON spec file")  # fmt: skip
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec field (YAML value), e.g. concurrency=[1,4]")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=None, help="repeats of the whole workload")
    parser.add_argument("--max-requests", type=int, default=None, help="request cap per load level")
    parser.add_argument("--max-duration", type=float, default=DEFAULT_MAX_DURATION_S, metavar="S",
                        help="wall-time cap per load level; in-flight requests are cancelled")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="report directory")
    parser.add_argument("--no-progress", action="store_true", help="no live progress bar")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL,
                        help="the one server to load (default: loopback port 8000)")  # fmt: skip
    _add_workload_arguments(parser)
    parser.add_argument(
        "--model", default=None, help="served model name (default: first of /v1/models)"
    )
    parser.add_argument("--api-key", default=None, help="sent as a bearer token")
    parser.add_argument("--label", default="server", help="the engine's name in the report")
    parser.add_argument(
        "--timeout", type=float, default=REQUEST_TIMEOUT_S, help="per-request timeout, s"
    )
    parser.add_argument("--no-fixed-length", action="store_true",
                        help="the server lacks ignore_eos/min_tokens: do not send them")  # fmt: skip
    parser.add_argument("--no-stream-usage", action="store_true",
                        help="the server lacks stream_options.include_usage")  # fmt: skip
    parser.add_argument("--token-ids", action="store_true",
                        help="the server returns generated ids (return_token_ids)")  # fmt: skip


def run_serve(args: argparse.Namespace) -> int:
    from agentcpu.bench import report
    from agentcpu.bench.progress import LiveProgress

    spec = load_workload(args.workload, parse_overrides(args.set))
    caps = ServerCaps(not args.no_fixed_length, not args.no_stream_usage, args.token_ids)
    limits = Limits(args.max_requests, args.max_duration)
    record = report.new_record(spec.to_dict(), command=_command_line())
    record["base_url"] = args.base_url
    report.engine_entry(record, args.label, caps=vars(caps))
    with LiveProgress(not args.no_progress) as live:
        for round_index in range(args.rounds or 1):
            for level_index, level in enumerate(spec.levels()):
                sink = live.level(
                    f"{args.label} r{round_index + 1} {level.label}", spec.requests_per_level(level)
                )
                outcome = asyncio.run(run_level(
                    args.base_url, spec, level, level_seed(spec.seed, round_index, level_index),
                    model=args.model, caps=caps, limits=limits, api_key=args.api_key,
                    on_result=sink, timeout_s=args.timeout,
                ))  # fmt: skip
                report.add_run(record, args.label, round_index, outcome)
    written = report.write_report(record, args.out) if args.out is not None else []
    return _finish(record, written)


def add_compare_arguments(parser: argparse.ArgumentParser, workload: str | None = None) -> None:
    from agentcpu.bench.compare import ENGINES

    _add_workload_arguments(parser, workload)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="Hugging Face model directory")
    source.add_argument(
        "--shape", help="make/use a random checkpoint of this shape (e.g. qwen2.5-0.5b)"
    )
    parser.add_argument(
        "--engines", default=",".join(ENGINES), help="comma-separated, run in this order"
    )
    parser.add_argument(
        "--baseline", default="vllm", help="ratios are against this engine ('none': no ratios)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--kv-cache-gib", type=float, default=None, help="KV cache of agentcpu and vLLM (default 4)"
    )
    parser.add_argument("--ready-timeout", type=float, default=900.0, metavar="S")
    parser.add_argument(
        "--gguf", type=Path, default=None, help="llama.cpp model (default: converted)"
    )
    parser.add_argument(
        "--llamacpp-type", default="bf16", choices=["bf16", "f16", "q8_0", "q4_0", "q4_k", "q6_k"]
    )
    parser.add_argument(
        "--llamacpp-parallel", type=int, default=None, help="slots (default: max in flight)"
    )
    for name in ENGINES:
        parser.add_argument(
            f"--{name}-args", default="", metavar="ARGS", help=f"extra {name} server arguments"
        )
    parser.add_argument("--no-doctor", action="store_true", help="skip `agentcpu doctor --json`")


def run_compare(args: argparse.Namespace) -> int:
    from agentcpu.bench.compare import ENGINES, CompareOptions, compare
    from agentcpu.bench.progress import LiveProgress

    engines = tuple(e.strip() for e in args.engines.split(",") if e.strip())
    baseline = None if args.baseline == "none" else args.baseline
    options = CompareOptions(
        spec=load_workload(args.workload, parse_overrides(args.set)), model=_model_dir(args),
        engines=engines, baseline=baseline if baseline in engines else None,
        rounds=args.rounds or 3, threads=args.threads,
        kv_cache_gib=DEFAULT_KV_CACHE_GIB if args.kv_cache_gib is None else args.kv_cache_gib,
        out_dir=args.out, ready_timeout_s=args.ready_timeout,
        limits=Limits(args.max_requests, args.max_duration), gguf=args.gguf,
        llamacpp_type=args.llamacpp_type, llamacpp_parallel=args.llamacpp_parallel,
        extra_args={n: tuple(shlex.split(getattr(args, f"{n}_args"))) for n in ENGINES},
        doctor=not args.no_doctor, command=_command_line(),
    )  # fmt: skip
    with LiveProgress(not args.no_progress) as live:
        record, written = compare(options, live)
    return _finish(record, written=written)


def add_agent_arguments(parser: argparse.ArgumentParser) -> None:
    add_compare_arguments(parser, workload="agent")
    parser.add_argument(
        "--pressure", action="store_true",
        help="64 sessions (workload agent-pressure) with a KV budget of about half their contexts",
    )  # fmt: skip


def run_agent(args: argparse.Namespace) -> int:
    """`bench agent`: `compare` on the agent workload; `--pressure` switches to the
    agent-pressure workload and, unless --kv-cache-gib is given, sizes every engine's
    KV cache to hold about half of all session contexts."""
    from agentcpu.bench.workloads import pressure_kv_cache_gib

    if args.pressure:
        if args.workload == "agent":
            args.workload = "agent-pressure"
        if args.kv_cache_gib is None:
            spec = load_workload(args.workload, parse_overrides(args.set))
            args.kv_cache_gib = round(pressure_kv_cache_gib(spec, _kv_bytes_per_token(_model_dir(args))), 3)
            print(f"KV cache per engine: {args.kv_cache_gib} GiB (half of all session contexts)",
                  file=sys.stderr)  # fmt: skip
    return run_compare(args)


def _kv_bytes_per_token(model: Path) -> int:
    """bf16 K and V of every layer for one token, from the model's config.json."""
    import json

    from agentcpu.hardware.roofline import kv_bytes_per_token

    return kv_bytes_per_token(json.loads((model / "config.json").read_text()))


def _model_dir(args: argparse.Namespace) -> Path:
    if args.model is not None:
        return args.model.resolve()
    from agentcpu.bench.checkpoints import make_random_checkpoint

    path = (BENCH_DIR / args.shape).resolve()
    if not (path / "config.json").is_file():
        make_random_checkpoint(args.shape, path)
    return path


def _finish(record: dict, written: list[Path]) -> int:
    """Print the table and the files written; exit 1 if any request failed."""
    from agentcpu.bench import report

    print(report.markdown(record))
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    errors = sum(run["metrics"]["errors"] for e in record["engines"].values() for run in e["runs"])
    if errors:
        print(f"agentcpu bench: {errors} requests failed (see errors_by_status)", file=sys.stderr)
    return 1 if errors else 0


def _command_line() -> str:
    return "agentcpu " + shlex.join(sys.argv[1:])


def main(argv: list[str] | None = None) -> int:
    """`python -m agentcpu.commands.bench_serve serve|compare ...` (the same as the CLI's)."""
    parser = argparse.ArgumentParser(prog="agentcpu bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_arguments(sub.add_parser("serve", help="load one OpenAI-compatible server"))
    add_compare_arguments(sub.add_parser("compare", help="agentcpu vs vLLM-CPU vs llama.cpp"))
    args = parser.parse_args(argv)
    return run_serve(args) if args.command == "serve" else run_compare(args)


if __name__ == "__main__":
    sys.exit(main())
