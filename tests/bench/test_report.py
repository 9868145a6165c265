"""Report records, tables with ratios, and the JSON / Markdown / PNG files."""

from __future__ import annotations

import json

import pytest

from agentcpu.bench import report
from agentcpu.bench.loadgen import RunOutcome
from agentcpu.bench.metrics import RequestResult
from agentcpu.bench.workloads import Level, load_workload

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DOCTOR = {
    "threads": 2, "bandwidth_gbs": 27.7, "bf16_tflops": 2.2,
    "model": {"roofline": {"stored": {"decode_tok_s": 28.0, "prefill_tok_s": 2200.0}}},
}  # fmt: skip


def _result(ttft, tokens, turn=None, session=None, cached=10):
    return RequestResult(
        prompt_tokens=100, expected_tokens=tokens, start_s=0.0, end_s=ttft + 0.01 * tokens,
        first_token_s=ttft, chunk_times=[ttft + 0.01 * i for i in range(tokens)],
        completion_tokens=tokens, usage_prompt_tokens=100, cached_tokens=cached, status=200,
        turn=turn, session=session,
    )  # fmt: skip


def _outcome(concurrency, wall_s, ttft, tokens=100, n=None):
    results = [_result(ttft, tokens) for _ in range(n or concurrency)]
    return RunOutcome(Level(concurrency), "m", results, wall_s)


@pytest.fixture
def concurrency_record():
    spec = load_workload("concurrency", {"concurrency": [1, 4]})
    record = report.new_record(
        spec.to_dict(), command="agentcpu bench compare", baseline="alpha", doctor=DOCTOR
    )
    for round_index in range(2):
        # beta: twice alpha's throughput, half its TTFT, at both levels
        report.add_run(record, "alpha", round_index, _outcome(1, 10.0, 0.4))
        report.add_run(record, "alpha", round_index, _outcome(4, 20.0, 0.8))
        report.add_server(record, "alpha", round_index, peak_rss_mb=1000.0 + round_index)
        report.add_run(record, "beta", round_index, _outcome(1, 5.0, 0.2))
        report.add_run(record, "beta", round_index, _outcome(4, 10.0, 0.4))
        report.add_server(record, "beta", round_index, peak_rss_mb=500.0)
    return record


def test_summary_rows_take_medians_and_ratios(concurrency_record):
    rows = {(r["engine"], r["label"]): r for r in report.summary_rows(concurrency_record)}
    alpha, beta = rows[("alpha", "c=1")], rows[("beta", "c=1")]
    assert alpha["output_tok_s"] == pytest.approx(10.0) and beta["output_tok_s"] == pytest.approx(
        20.0
    )
    assert rows[("beta", "c=4")]["output_tok_s"] == pytest.approx(40.0)
    assert beta["output_tok_s_vs_base"] == pytest.approx(2.0) and alpha[
        "output_tok_s_vs_base"
    ] == pytest.approx(1.0)
    assert beta["ttft_p50_vs_base"] == pytest.approx(0.5) and beta["wall_vs_base"] == pytest.approx(
        0.5
    )
    assert (
        alpha["rounds"] == 2
        and alpha["errors"] == 0
        and alpha["cached_share"] == pytest.approx(0.1)
    )
    assert alpha["peak_rss_mb"] == pytest.approx(1001.0)
    # roofline: c=1 -> 28 tok/s; c=4 -> min(4 x 28, 2200) = 112 tok/s
    assert alpha["of_roofline"] == pytest.approx(10 / 28)
    assert rows[("beta", "c=4")]["of_roofline"] == pytest.approx(40 / 112)


def test_markdown_table(concurrency_record):
    text = report.markdown(concurrency_record)
    assert "| beta | c=1 | 2 |" in text and "2.00x" in text and "0.50x" in text
    assert "27.7 GB/s" in text and "decode 28.0 tok/s" in text
    assert text.count("\n| alpha |") == 2


def test_write_report_files(concurrency_record, tmp_path):
    paths = report.write_report(concurrency_record, tmp_path / "out")
    names = {p.name for p in paths}
    assert {
        "results.json",
        "results.md",
        "doctor.json",
        "throughput_vs_load.png",
        "ttft_cdf.png",
    } <= names
    assert "per_turn_ttft.png" not in names  # no sessions in this workload
    for path in paths:
        assert path.stat().st_size > 0
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == PNG_MAGIC
    loaded = json.loads((tmp_path / "out" / "results.json").read_text())
    assert report.summary_rows(loaded) == report.summary_rows(concurrency_record)
    assert json.loads((tmp_path / "out" / "doctor.json").read_text()) == DOCTOR


def test_sessions_report_has_per_turn_ttft(tmp_path):
    spec = load_workload("agent")
    record = report.new_record(spec.to_dict(), command="x", baseline=None)
    for engine, scale in (("alpha", 1.0), ("beta", 2.0)):
        results = [
            _result(scale * 0.1 * turn, 8, turn=turn, session=s)
            for s in range(2)
            for turn in (1, 2, 3)
        ]
        report.add_run(record, engine, 0, RunOutcome(Level(16), "m", results, 3.0))
    report.add_server(record, "alpha", 0, prefill_calibration={"tokens": 300, "ttft_s": 1.0})
    turns = report.per_turn_ttft(record)
    assert turns["beta"][3] == pytest.approx([0.6, 0.6])
    text = report.markdown(record)
    assert "| beta | 200 | 400 | 600 |" in text
    # alpha prefills 300 tok/s alone; follow-ups compute 90 tokens (100 - 10 cached) in
    # 0.2 s and 0.3 s of TTFT: 0.67x and 1.0x. beta has no calibration: no line.
    assert "- alpha: p50 0.83x, p95 1.00x (4 turns; prefill alone 300 tok/s)" in text
    assert "- beta:" not in text
    paths = {p.name for p in report.write_report(record, tmp_path)}
    assert "per_turn_ttft.png" in paths and "throughput_vs_load.png" not in paths
    assert (tmp_path / "per_turn_ttft.png").read_bytes()[:8] == PNG_MAGIC


def test_rerender_from_json(concurrency_record, tmp_path, capsys):
    report.write_report(concurrency_record, tmp_path)
    (tmp_path / "results.md").unlink()
    assert report.main([str(tmp_path / "results.json")]) == 0
    assert (tmp_path / "results.md").is_file()
    assert report.main([]) == 2


def test_default_out_dir():
    assert (
        str(report.default_out_dir("agent", date="2025-01-02"))
        == "benchmarks/results/2025-01-02-agent"
    )
