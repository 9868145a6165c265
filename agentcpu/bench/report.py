"""Served-benchmark records: JSON, a Markdown table with ratios, and PNG plots.

A record holds, per engine, every run (round x load level) with its `summarize`
figures and compact per-request rows, plus each server start's peak RSS. The tables
quote medians over rounds; ratios are engine / baseline at the same load level.
Plots (matplotlib, Agg): throughput vs load, TTFT CDF per level, per-turn TTFT for
session workloads. `python -m agentcpu.bench.report DIR/results.json` re-renders.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from agentcpu.bench.loadgen import RunOutcome
from agentcpu.bench.metrics import (
    cdf,
    follow_up_prefill_ratios,
    median_or_none,
    percentile,
    summarize,
)

RESULTS_ROOT = Path("benchmarks/results")
JSON_NAME, MARKDOWN_NAME, DOCTOR_NAME = "results.json", "results.md", "doctor.json"
PLOT_DPI = 120
MS = 1000.0


# ---- building a record ---------------------------------------------------------------


def new_record(
    spec: dict[str, Any], *, command: str, baseline: str | None = None,
    doctor: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    return {
        "workload": spec["name"], "kind": spec["kind"], "spec": spec, "command": command,
        "commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "host": platform.node(), "python": sys.version.split()[0], "doctor": doctor,
        "baseline": baseline, "engines": {},
    }  # fmt: skip


def engine_entry(record: dict[str, Any], engine: str, caps: dict[str, Any] | None = None) -> dict:
    entry = record["engines"].setdefault(engine, {"caps": caps or {}, "servers": [], "runs": []})
    if caps:
        entry["caps"] = caps
    return entry


def add_run(record: dict[str, Any], engine: str, round_index: int, outcome: RunOutcome) -> dict:
    """Append one level's outcome (summarized) to `engine`'s runs; returns the run."""
    run = {
        "round": round_index, "label": outcome.level.label, "x": outcome.level.x,
        "concurrency": outcome.level.concurrency, "rate": outcome.level.rate,
        "model": outcome.model, "truncated": outcome.truncated,
        "metrics": summarize(outcome.results, outcome.wall_s),
        "requests": [r.to_record() for r in outcome.results],
    }  # fmt: skip
    engine_entry(record, engine)["runs"].append(run)
    return run


def add_server(record: dict[str, Any], engine: str, round_index: int, **figures: Any) -> None:
    """Record one server start (peak RSS, seconds to ready, ...)."""
    engine_entry(record, engine)["servers"].append({"round": round_index, **figures})


# ---- summary rows --------------------------------------------------------------------

# row key -> path into a run's metrics
_MEDIAN_FIELDS = {
    "wall_s": ("wall_s",), "output_tok_s": ("output_tok_s",),
    "processed_tok_s": ("processed_tok_s",), "computed_tok_s": ("computed_tok_s",),
    "requests_per_s": ("requests_per_s",), "ttft_p50_s": ("ttft_s", "p50"),
    "ttft_p95_s": ("ttft_s", "p95"), "ttft_p99_s": ("ttft_s", "p99"),
    "tpot_p50_s": ("tpot_s", "p50"), "tpot_p95_s": ("tpot_s", "p95"),
    "itl_p50_s": ("itl_s", "p50"), "itl_p99_s": ("itl_s", "p99"),
    "cached_share": ("cached_share",),
}  # fmt: skip


def _get(metrics: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        metrics = metrics.get(key) if isinstance(metrics, dict) else None
    return metrics


def summary_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (engine, level): medians over rounds, error sums, ratios to baseline."""
    rows = []
    for engine, entry in record["engines"].items():
        peak = max(
            (s["peak_rss_mb"] for s in entry["servers"] if s.get("peak_rss_mb")), default=None
        )
        for label, runs in _by_label(entry["runs"]).items():
            row: dict[str, Any] = {
                "engine": engine,
                "label": label,
                "x": runs[0]["x"],
                "rounds": len(runs),
            }
            for key, path in _MEDIAN_FIELDS.items():
                row[key] = median_or_none(_get(run["metrics"], path) for run in runs)
            row["errors"] = sum(run["metrics"]["errors"] for run in runs)
            row["errors_by_status"] = _sum_counts(
                run["metrics"]["errors_by_status"] for run in runs
            )
            row["length_mismatches"] = sum(run["metrics"]["length_mismatches"] for run in runs)
            row["truncated"] = any(run["truncated"] for run in runs)
            row["peak_rss_mb"] = peak
            rows.append(row)
    _add_ratios(rows, record.get("baseline"))
    _add_roofline_share(rows, record)
    return rows


def _by_label(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        grouped.setdefault(run["label"], []).append(run)
    return grouped


def _sum_counts(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for count in counts:
        for key, value in count.items():
            total[key] = total.get(key, 0) + value
    return total


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def _add_ratios(rows: list[dict[str, Any]], baseline: str | None) -> None:
    base = {row["label"]: row for row in rows if row["engine"] == baseline}
    for row in rows:
        ref = base.get(row["label"], {})
        row["output_tok_s_vs_base"] = _ratio(row["output_tok_s"], ref.get("output_tok_s"))
        row["ttft_p50_vs_base"] = _ratio(row["ttft_p50_s"], ref.get("ttft_p50_s"))
        row["wall_vs_base"] = _ratio(row["wall_s"], ref.get("wall_s"))


def roofline_limits(doctor: dict[str, Any] | None) -> dict[str, float] | None:
    """decode / prefill tok/s of the stored weights, from `doctor --json --model`."""
    try:
        stored = doctor["model"]["roofline"]["stored"]  # type: ignore[index]
        return {"decode_tok_s": stored["decode_tok_s"], "prefill_tok_s": stored["prefill_tok_s"]}
    except (KeyError, TypeError):
        return None


def _add_roofline_share(rows: list[dict[str, Any]], record: dict[str, Any]) -> None:
    """Requests workloads: output tok/s of min(streams x decode, prefill) roofline (weights
    read once per step, compute-bound beyond); sessions: computed tok/s of prefill's."""
    limits = roofline_limits(record.get("doctor"))
    for row in rows:
        row["of_roofline"] = None
        if limits is None:
            continue
        if record["kind"] == "sessions":
            row["of_roofline"] = _ratio(
                row["computed_tok_s"] or row["processed_tok_s"], limits["prefill_tok_s"]
            )
        elif row["x"]:
            bound = min(row["x"] * limits["decode_tok_s"], limits["prefill_tok_s"])
            row["of_roofline"] = _ratio(row["output_tok_s"], bound)


def prefill_rate(entry: dict[str, Any]) -> float | None:
    """Median over an engine's server starts of its calibration prefill tok/s."""
    rates = [c["tokens"] / c["ttft_s"] for server in entry.get("servers", [])
             if (c := server.get("prefill_calibration")) and c.get("ttft_s")]  # fmt: skip
    return median_or_none(rates)


def per_turn_ttft(record: dict[str, Any]) -> dict[str, dict[int, list[float]]]:
    """engine -> turn -> TTFTs of successful requests, pooled over rounds and levels."""
    out: dict[str, dict[int, list[float]]] = {}
    for engine, entry in record["engines"].items():
        for run in entry["runs"]:
            for req in run["requests"]:
                if req["error"] is None and req["turn"] is not None and req["ttft_s"] is not None:
                    out.setdefault(engine, {}).setdefault(req["turn"], []).append(req["ttft_s"])
    return out


# ---- Markdown ------------------------------------------------------------------------


def _fmt(value: Any, scale: float = 1.0, digits: int = 1, suffix: str = "") -> str:
    if value is None:
        return "–"
    return f"{value * scale:,.{digits}f}{suffix}"


def markdown(record: dict[str, Any]) -> str:
    rows = summary_rows(record)
    baseline = record.get("baseline")
    lines = [
        f"# `{record['workload']}` served benchmark — {record['date']}", "",
        f"- command: `{record['command']}`", f"- commit: `{record['commit']}`, host `{record['host']}`",
        f"- machine: {_machine_line(record.get('doctor'))}",
        f"- medians over rounds; ratios are engine / `{baseline}` at the same load" if baseline
        else "- medians over rounds", "",
        "| engine | load | rounds | wall s | out tok/s | out x base | processed tok/s | req/s "
        "| TTFT p50 / p95 / p99 ms | TTFT p50 x base | TPOT p50 ms | ITL p99 ms | cached % "
        "| of roofline | peak RSS MB | errors | len mismatch |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]  # fmt: skip
    lines += [_markdown_row(row) for row in rows]
    lines += _turn_table(record)
    return "\n".join(lines) + "\n"


def _markdown_row(row: dict[str, Any]) -> str:
    ttft = " / ".join(_fmt(row[k], MS, 0) for k in ("ttft_p50_s", "ttft_p95_s", "ttft_p99_s"))
    errors = str(row["errors"]) + (f" {row['errors_by_status']}" if row["errors"] else "")
    load = row["label"] + (" (cut short)" if row["truncated"] else "")
    cells = [
        row["engine"], load, str(row["rounds"]), _fmt(row["wall_s"], digits=2),
        _fmt(row["output_tok_s"]), _fmt(row["output_tok_s_vs_base"], digits=2, suffix="x"),
        _fmt(row["processed_tok_s"]), _fmt(row["requests_per_s"], digits=2), ttft,
        _fmt(row["ttft_p50_vs_base"], digits=2, suffix="x"), _fmt(row["tpot_p50_s"], MS),
        _fmt(row["itl_p99_s"], MS), _fmt(row["cached_share"], 100), _fmt(row["of_roofline"], 100, 0, "%"),
        _fmt(row["peak_rss_mb"], digits=0), errors, str(row["length_mismatches"]),
    ]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def _turn_table(record: dict[str, Any]) -> list[str]:
    turns = per_turn_ttft(record)
    if not turns:
        return []
    numbers = sorted({t for by_turn in turns.values() for t in by_turn})
    lines = ["", "TTFT p50 per turn, ms (pooled over rounds):", "",
             "| engine | " + " | ".join(f"turn {n}" for n in numbers) + " |",
             "|---|" + "--:|" * len(numbers)]  # fmt: skip
    for engine, by_turn in turns.items():
        cells = [_fmt(median_or_none(by_turn.get(n, [])), MS, 0) for n in numbers]
        lines.append(f"| {engine} | " + " | ".join(cells) + " |")
    lines += ["", "Follow-up TTFT over the time to prefill only its computed tokens (prompt - "
              "cached) at the engine's own prefill rate, measured alone before the load "
              "(1.0 = no queueing, no recompute; pooled over rounds):", ""]
    for engine, entry in record["engines"].items():
        rate = prefill_rate(entry)
        ratios = follow_up_prefill_ratios(
            (req for run in entry["runs"] for req in run["requests"]), rate or 0.0)
        if ratios:
            lines.append(f"- {engine}: p50 {_fmt(percentile(ratios, 50), digits=2)}x, p95 "
                         f"{_fmt(percentile(ratios, 95), digits=2)}x ({len(ratios)} turns; "
                         f"prefill alone {_fmt(rate, digits=0)} tok/s)")
    return lines


def _machine_line(doctor: dict[str, Any] | None) -> str:
    if not doctor:
        return "no `doctor` report"
    line = (f"{doctor.get('threads')} threads, read bandwidth {_fmt(doctor.get('bandwidth_gbs'))} GB/s, "
            f"bf16 {_fmt(doctor.get('bf16_tflops'), digits=2)} TFLOPS")  # fmt: skip
    limits = roofline_limits(doctor)
    if limits:
        line += (f"; model roofline decode {_fmt(limits['decode_tok_s'])} tok/s, "
                 f"prefill {_fmt(limits['prefill_tok_s'], digits=0)} tok/s")  # fmt: skip
    return line


# ---- plots ---------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_throughput(record: dict[str, Any], path: Path) -> Path | None:
    """Output tok/s (median over rounds) against load level, one line per engine."""
    rows = summary_rows(record)
    if len({row["x"] for row in rows}) < 2:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for engine in record["engines"]:
        points = sorted((row["x"], row["output_tok_s"]) for row in rows if row["engine"] == engine)
        ax.plot([p[0] for p in points], [p[1] or 0 for p in points], marker="o", label=engine)
    rate_levels = any(row["label"].startswith("rate") for row in rows)
    ax.set_xlabel("arrival rate (jobs/s)" if rate_levels else "concurrent streams")
    levels = sorted({row["x"] for row in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [f"{x:g}" for x in levels])
    ax.set_ylim(bottom=0)
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"{record['workload']}: throughput vs load")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_ttft_cdf(record: dict[str, Any], path: Path) -> Path | None:
    """Empirical TTFT CDF per engine, one panel per load level."""
    labels = list(
        dict.fromkeys(run["label"] for e in record["engines"].values() for run in e["runs"])
    )
    if not labels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(labels), figsize=(4 * len(labels), 3.5), squeeze=False)
    for ax, label in zip(axes[0], labels, strict=True):
        for engine, entry in record["engines"].items():
            ttfts = [req["ttft_s"] for run in entry["runs"] if run["label"] == label
                     for req in run["requests"] if req["error"] is None]  # fmt: skip
            xs, ys = cdf(ttfts)
            if xs:
                ax.step([xs[0], *xs], [0.0, *ys], where="post", label=engine)
        ax.set_title(label)
        ax.set_xlim(left=0)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("TTFT (s)")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("fraction of requests")
    axes[0][0].legend()
    fig.suptitle(f"{record['workload']}: time to first token")
    return _save(fig, path)


def plot_per_turn_ttft(record: dict[str, Any], path: Path) -> Path | None:
    """TTFT p50 (solid) and p95 (dashed) by session turn, one colour per engine."""
    from agentcpu.bench.metrics import percentile

    turns = per_turn_ttft(record)
    if not turns:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for engine, by_turn in turns.items():
        numbers = sorted(by_turn)
        (line,) = ax.plot(
            numbers, [percentile(by_turn[n], 50) for n in numbers], marker="o", label=engine
        )
        ax.plot(
            numbers,
            [percentile(by_turn[n], 95) for n in numbers],
            linestyle="--",
            color=line.get_color(),
        )
    ax.set_xticks(sorted({n for by_turn in turns.values() for n in by_turn}))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("turn")
    ax.set_ylabel("TTFT (s): p50 solid, p95 dashed")
    ax.set_title(f"{record['workload']}: TTFT per turn")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)
    return path


PLOTS = {
    "throughput_vs_load.png": plot_throughput,
    "ttft_cdf.png": plot_ttft_cdf,
    "per_turn_ttft.png": plot_per_turn_ttft,
}


# ---- writing -------------------------------------------------------------------------


def default_out_dir(workload: str, root: Path = RESULTS_ROOT, date: str | None = None) -> Path:
    return Path(root) / f"{date or time.strftime('%Y-%m-%d')}-{workload}"


def write_report(record: dict[str, Any], out_dir: str | Path, plots: bool = True) -> list[Path]:
    """Write results.json, results.md, doctor.json (if any) and the plots; returns paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / JSON_NAME, out / MARKDOWN_NAME]
    (out / JSON_NAME).write_text(json.dumps(record, indent=1) + "\n")
    (out / MARKDOWN_NAME).write_text(markdown(record))
    if record.get("doctor"):
        (out / DOCTOR_NAME).write_text(json.dumps(record["doctor"], indent=2) + "\n")
        written.append(out / DOCTOR_NAME)
    return written + (write_plots(record, out) if plots else [])


def write_plots(record: dict[str, Any], out: Path) -> list[Path]:
    try:
        _pyplot()
    except ImportError:
        warnings.warn(
            "matplotlib is not installed (pip install agentcpu[bench]): no plots", stacklevel=2
        )
        return []
    return [p for name, plot in PLOTS.items() if (p := plot(record, out / name)) is not None]


def git_commit() -> str:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
        return done.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m agentcpu.bench.report DIR/results.json", file=sys.stderr)
        return 2
    source = Path(args[0])
    record = json.loads(source.read_text())
    for path in write_report(record, source.parent):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
