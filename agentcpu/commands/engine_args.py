"""Engine options shared by every subcommand that loads a model."""

from __future__ import annotations

import argparse

from agentcpu.config import SchedulerConfig
from agentcpu.kvcache import spill


def add_engine_arguments(parser: argparse.ArgumentParser, model_required: bool = True) -> None:
    parser.add_argument("--model", required=model_required, help="HF model directory or .gguf file")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--quant", default=None, help="weight-only quantization: int8 | int4")
    parser.add_argument(
        "--max-model-len", type=int, default=None, help="context length (default: model's, capped)"
    )
    parser.add_argument("--kv-cache-gb", type=float, default=1.0, help="KV cache pool size in GiB")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="sequences per step")
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=SchedulerConfig.max_num_batched_tokens,
        help="tokens per step (default %(default)s)",
    )
    parser.add_argument(
        "--max-step-ms",
        type=float,
        default=0.0,
        help="while streams decode, cap each step's prefill to about this wall"
        " time, learned online (bounds the gap between tokens, e.g. 500 for chat UIs;"
        " costs throughput; default 0: off)",
    )
    parser.add_argument("--no-prefix-caching", action="store_true", help="disable the prefix cache")
    parser.add_argument(
        "--kv-spill-gb",
        default="auto",
        type=_spill_gb,
        help="disk budget (GiB) for KV blocks evicted from the pool and expired session"
        " pins, restored when a prompt continues into them (0: off; default auto:"
        f" {spill.DEFAULT_SHARE_OF_FREE * 100:g}%% of the free space, at most"
        f" {spill.DEFAULT_MAX_GB:g}, none on tmpfs)",
    )
    parser.add_argument(
        "--kv-spill-dir",
        default=None,
        help="where spilled KV goes (default: a fresh temporary directory, removed at exit)",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (default: physical cores)"
    )


def engine_options(args: argparse.Namespace) -> dict:
    return dict(
        dtype=args.dtype,
        quant=args.quant,
        max_model_len=args.max_model_len,
        kv_cache_gb=args.kv_cache_gb,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_step_ms=args.max_step_ms,
        enable_prefix_caching=not args.no_prefix_caching,
        threads=args.threads,
        spill_gb=spill.default_spill_gb(args.kv_spill_dir)
        if args.kv_spill_gb == "auto"
        else args.kv_spill_gb,
        spill_dir=args.kv_spill_dir,
    )


def _spill_gb(value: str) -> float | str:
    if value == "auto":
        return value
    try:
        gb = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected GiB (a number) or 'auto', got {value!r}"
        ) from None
    if gb < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return gb
