"""`agentcpu doctor`: what this machine is, what it measures, and (given a model) the
roofline every benchmark reports against. Nothing is cached: each run measures afresh.

JSON keys: schema, cpu (CpuInfo fields), threads, torch_version, quick, bandwidth_gbs,
bf16_tflops, fp32_tflops, int8_tops (None where int8 matmul is unavailable),
matmul_tflops / matmul_dtype (the faster of bf16 and fp32, used for prefill rooflines),
probe_seconds, and with a model: model = {path, footprint, roofline: {stored, int8,
int4_g32, int4_g32_sym}}, each roofline {step_bytes, decode_step_ms, decode_tok_s, prefill_tok_s}.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from agentcpu.errors import AgentCPUError
from agentcpu.hardware import huge_pages
from agentcpu.hardware.cpu_features import ALL_FEATURES, detect_cpu
from agentcpu.hardware.probe import (
    ProbeUnsupportedError,
    measure_matmul_flops,
    measure_read_bandwidth,
)
from agentcpu.hardware.roofline import (
    ModelFootprint,
    agentcpu_quant_footprint,
    model_footprint,
    roofline,
)
from agentcpu.hardware.threads import configure_threads

REPORT_SCHEMA = 1
TERA = 1e12
INT4_GROUP_SIZE = 32


@dataclass(frozen=True)
class ProbeSettings:
    read_bytes: int
    read_repeats: int
    matmul_budget_s: float  # per dtype


FULL_PROBE = ProbeSettings(read_bytes=1 << 30, read_repeats=5, matmul_budget_s=2.0)
QUICK_PROBE = ProbeSettings(read_bytes=256 << 20, read_repeats=3, matmul_budget_s=0.5)


def _tera(dtype: torch.dtype, budget_s: float) -> float | None:
    try:
        return measure_matmul_flops(dtype, budget_s=budget_s) / TERA
    except ProbeUnsupportedError:
        return None


def _measure(settings: ProbeSettings) -> dict[str, Any]:
    bandwidth = measure_read_bandwidth(settings.read_bytes, settings.read_repeats)
    bf16 = _tera(torch.bfloat16, settings.matmul_budget_s)
    fp32 = _tera(torch.float32, settings.matmul_budget_s)
    best_dtype, best = max((("bf16", bf16 or 0.0), ("fp32", fp32 or 0.0)), key=lambda p: p[1])
    return {
        "bandwidth_gbs": bandwidth,
        "bf16_tflops": bf16,
        "fp32_tflops": fp32,
        "int8_tops": _tera(torch.int8, settings.matmul_budget_s),
        "matmul_tflops": best,
        "matmul_dtype": best_dtype,
    }


def _model_section(path: str, footprint: ModelFootprint, limits: dict[str, Any]) -> dict:
    """Rooflines with prefill at the faster float matmul: on a CPU without native bf16
    an engine would compute in fp32, and a roofline is the best case."""
    bandwidth, flops = limits["bandwidth_gbs"], limits["matmul_tflops"] * TERA

    def quant(method: str, symmetric: bool) -> dict[str, float]:
        held = agentcpu_quant_footprint(footprint, method, INT4_GROUP_SIZE, symmetric)
        return roofline(held, bandwidth, flops)

    return {
        "path": path,
        "footprint": footprint.to_dict(),
        "roofline": {
            "stored": roofline(footprint, bandwidth, flops),
            "int8": quant("int8", symmetric=True),
            "int4_g32": quant("int4", symmetric=False),
            "int4_g32_sym": quant("int4", symmetric=True),
        },
    }


def doctor_report(model_path: str | None = None, quick: bool = False) -> dict[str, Any]:
    """Detect and measure this machine (~10 s; quick: ~3 s) on torch's current threads.

    The model, if given, is read first (headers only), so a bad path fails before the
    probes run. Raises ModelLoadError for a missing or malformed checkpoint.
    """
    footprint = model_footprint(model_path) if model_path is not None else None
    started = time.perf_counter()
    limits = _measure(QUICK_PROBE if quick else FULL_PROBE)
    report: dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "cpu": detect_cpu().to_dict(),
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "quick": quick,
        "huge_pages": huge_pages.thp_mode() if huge_pages.enabled() else "off",
        **limits,
        "probe_seconds": time.perf_counter() - started,
    }
    if footprint is not None:
        report["model"] = _model_section(str(model_path), footprint, limits)
    return report


def add_doctor_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--model", metavar="PATH", help="safetensors model dir: print its roofline")
    parser.add_argument("--quick", action="store_true", help="smaller, faster, noisier probes")
    parser.add_argument(
        "--threads", type=int, metavar="N", help="torch threads (default: physical cores)"
    )


def run_doctor(args: argparse.Namespace) -> int:
    """Entry point for `agentcpu doctor`; returns the process exit code."""
    try:
        if getattr(args, "threads", None) is not None:
            configure_threads(args.threads)
        report = doctor_report(getattr(args, "model", None), quick=getattr(args, "quick", False))
    except AgentCPUError as exc:
        print(f"agentcpu doctor: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2) if args.json else format_doctor(report))
    return 0


def _fmt(value: float | None, unit: str, digits: int = 2) -> str:
    return "unavailable" if value is None else f"{value:,.{digits}f} {unit}"


def _machine_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    cpu = report["cpu"]
    features = [name for name in ALL_FEATURES if cpu.get(name)]
    return [
        ("CPU", f"{cpu['model_name']} ({cpu['arch']})"),
        ("cores", f"{cpu['physical_cores']} physical, {cpu['logical_cores']} logical"),
        ("features", ", ".join(features) or "none detected"),
        ("torch", f"{report['torch_version']}, capability {cpu['torch_capability']}"),
        ("threads", str(report["threads"])),
        ("huge pages", _huge_pages_row(report.get("huge_pages"))),
        ("read bandwidth", _fmt(report["bandwidth_gbs"], "GB/s", 1)),
        ("bf16 matmul", _fmt(report["bf16_tflops"], "TFLOPS", 3)),
        ("fp32 matmul", _fmt(report["fp32_tflops"], "TFLOPS", 3)),
        ("int8 matmul", _fmt(report["int8_tops"], "TOPS", 3)),
    ]


def _huge_pages_row(mode: str | None) -> str:
    if mode == "off":
        return f"off (kernel THP mode: {huge_pages.thp_mode()}, or {huge_pages.DISABLE_ENV}=0)"
    return f"weights and KV pool (THP {mode})" if mode else "unknown"


def _table(title: str, columns: list[str] | None, rows: list[tuple[str, ...]]) -> Any:
    """A rich table; columns None: two unlabelled columns (name, value)."""
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_header=columns is not None)
    columns = columns or ["", ""]
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    return table


def _roofline_rows(model: dict[str, Any]) -> list[tuple[str, ...]]:
    return [
        (
            name,
            _fmt(limits["step_bytes"] / 1e9, "GB"),
            _fmt(limits["decode_step_ms"], "ms"),
            _fmt(limits["decode_tok_s"], "tok/s", 1),
            _fmt(limits["prefill_tok_s"], "tok/s", 0),
        )
        for name, limits in model["roofline"].items()
    ]


def format_doctor(report: dict[str, Any]) -> str:
    """The report as plain-text tables for a terminal."""
    from rich.console import Console

    out = io.StringIO()
    console = Console(file=out, width=100, color_system=None, force_terminal=False)
    console.print(_table("agentcpu doctor", None, _machine_rows(report)))
    if "model" in report:
        columns = ["weights", "read / step", "decode step >=", "decode <=", "prefill <="]
        title = f"roofline: {report['model']['path']} (1 stream, empty context)"
        console.print(_table(title, columns, _roofline_rows(report["model"])))
    return out.getvalue()
