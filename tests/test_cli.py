"""The CLI end to end: the commands a new user runs first."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from agentcpu.cli import main
from agentcpu.demo.runner import DEMO_MODEL_DIR


def _agentcpu(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "agentcpu.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_demo_runs_agents_on_the_embedded_model():
    result = _agentcpu("demo", "--tasks", "4", "--concurrency", "4", "--min-success", "0", "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    assert "success" in result.stdout and "of 4 tasks" in result.stdout
    assert "prompt tokens from cache" in result.stdout


def test_demo_exits_nonzero_below_the_threshold():
    result = _agentcpu("demo", "--tasks", "2", "--min-success", "1.01", "--dtype", "float32")
    assert result.returncode == 1


def test_generate_streams_and_reports(capsys):
    code = main(["generate", "--prompt", "Hello", "--max-tokens", "5", "--ignore-eos", "--dtype", "float32",
                 "--model", str(DEMO_MODEL_DIR)])
    captured = capsys.readouterr()
    assert code == 0
    assert "5 generated" in captured.err


def test_bad_model_path_is_a_clear_error(capsys, tmp_path):
    code = main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_doctor_json(capsys):
    assert main(["doctor", "--json", "--quick"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["bandwidth_gbs"] > 0 and report["threads"] >= 1


def test_bench_kernel_prints_every_method_against_the_bandwidth(capsys, tmp_path):
    out = tmp_path / "kernel.json"
    args = ["bench", "kernel", "--batches", "1", "--shapes", "o", "--rounds", "1", "--working-set-mb", "8"]
    assert main([*args, "--json", str(out)]) == 0
    table = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    methods = {r["method"] for r in rows}
    assert {"bf16 F.linear", "fp32 F.linear"} <= methods and len(methods) >= 3
    assert all(r["shape"] == "o 896->896" and r["batch"] == 1 and r["gbps"] > 0 for r in rows)
    assert "% bw" in table and all(m in table for m in methods)


def test_bench_reports_each_quant_against_its_own_roofline(tmp_path):
    """Each --quant is measured against the bytes it stores: fewer bytes (symmetric int4
    keeps no offsets, bigger groups fewer scales) is a higher decode limit; int8 and
    int4-g32 match the doctor's own rooflines."""
    from agentcpu.bench.checkpoints import make_random_checkpoint
    from agentcpu.commands.bench import roofline_limits
    from agentcpu.hardware.doctor import doctor_report

    model = str(make_random_checkpoint("tiny-qwen2", tmp_path / "tiny"))
    doctor = doctor_report(model_path=model, quick=True)
    rate = {
        q: roofline_limits(doctor, model, q)["decode_tok_s"]
        for q in (None, "int8", "int4-g32", "int4-g128", "int4-g32-sym")
    }
    assert rate["int4-g32-sym"] > rate["int4-g32"] > rate["int8"] > rate[None]
    assert rate["int4-g128"] > rate["int4-g32"]
    rooflines = doctor["model"]["roofline"]
    assert rate["int8"] == rooflines["int8"]["decode_tok_s"]
    assert rate["int4-g32"] == rooflines["int4_g32"]["decode_tok_s"]
    assert rate["int4-g32-sym"] == rooflines["int4_g32_sym"]["decode_tok_s"]


def test_bench_decode_roofline_counts_the_context_kv(tmp_path):
    """`bench decode --context-len N`: each step also reads N tokens of KV, so the limit
    falls by exactly those bytes; no context is the doctor's stored-weights roofline."""
    from agentcpu.bench.checkpoints import make_random_checkpoint
    from agentcpu.commands.bench import roofline_limits
    from agentcpu.hardware.doctor import doctor_report
    from agentcpu.hardware.roofline import model_footprint

    model = str(make_random_checkpoint("tiny-qwen2", tmp_path / "tiny"))
    doctor = doctor_report(model_path=model, quick=True)
    empty = roofline_limits(doctor, model, None)
    assert roofline_limits(doctor, model, None, 0) == empty
    deep = roofline_limits(doctor, model, None, 4096)
    kv = 4096 * model_footprint(model).kv_bytes_per_token
    assert kv > 0 and deep["step_bytes"] == empty["step_bytes"] + kv
    assert deep["decode_tok_s"] < empty["decode_tok_s"]
    assert roofline_limits(doctor, model, "int8", 4096)["decode_tok_s"] > deep["decode_tok_s"]


def test_bench_decode_refuses_an_empty_context(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "decode", "--shape", "qwen2.5-0.5b", "--context-len", "0"])
    assert exit_info.value.code == 2
    assert "--context-len: must be >= 1, got 0" in capsys.readouterr().err


def test_int8_prefill_roofline_is_the_int8_matmul_where_products_run_in_int8(tmp_path):
    """An int8 model's linears compute in int8 on VNNI CPUs (`quant/csrc/int8_vnni.cpp`),
    so its prefill limit is the doctor's int8 matmul rate there, the float one elsewhere;
    int4 dequantizes to bf16 and keeps the float rate."""
    from agentcpu.bench.checkpoints import make_random_checkpoint
    from agentcpu.commands.bench import roofline_limits
    from agentcpu.hardware.doctor import doctor_report
    from agentcpu.quant import ops

    model = str(make_random_checkpoint("tiny-qwen2", tmp_path / "tiny"))
    doctor = doctor_report(model_path=model, quick=True)
    doctor["int8_tops"] = 10 * doctor["matmul_tflops"]
    float_rate = roofline_limits(doctor, model, "int4-g32", 1)["prefill_tok_s"]
    int8_rate = roofline_limits(doctor, model, "int8", 1)["prefill_tok_s"]
    assert int8_rate == pytest.approx(float_rate * (10 if ops.vnni_path() else 1))
    doctor["int8_tops"] = None  # no int8 matmul measured: the float rate
    assert roofline_limits(doctor, model, "int8", 1)["prefill_tok_s"] == pytest.approx(float_rate)
