import argparse
import json

import pytest

from agentcpu.hardware import doctor
from agentcpu.hardware.doctor import (
    add_doctor_arguments,
    doctor_report,
    format_doctor,
    run_doctor,
)
from tests.hardware.tiny_checkpoint import write_tiny_checkpoint

FIGURES = ("bandwidth_gbs", "bf16_tflops", "fp32_tflops", "matmul_tflops")


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("tiny-model")
    write_tiny_checkpoint(model_dir, tied=True)
    return doctor_report(str(model_dir), quick=True)


def test_quick_report_has_documented_keys_and_positive_figures(quick_report):
    for key in ("schema", "cpu", "threads", "torch_version", "int8_tops", *FIGURES):
        assert key in quick_report, key
    assert all(quick_report[key] > 0 for key in FIGURES)
    assert quick_report["int8_tops"] is None or quick_report["int8_tops"] > 0
    assert quick_report["threads"] >= 1
    assert quick_report["huge_pages"] in ("always", "madvise", "off")
    assert quick_report["cpu"]["arch"]
    json.dumps(quick_report)


def test_quick_report_model_roofline(quick_report):
    model = quick_report["model"]
    assert model["footprint"]["tied_embeddings"]
    assert set(model["roofline"]) == {"stored", "int8", "int4_g32", "int4_g32_sym"}
    for limits in model["roofline"].values():
        assert limits["decode_tok_s"] > 0 and limits["prefill_tok_s"] > 0
    rates = {name: limits["decode_tok_s"] for name, limits in model["roofline"].items()}
    assert rates["int4_g32_sym"] > rates["int4_g32"] > rates["int8"] > rates["stored"]


def test_format_doctor_mentions_the_figures(quick_report):
    text = format_doctor(quick_report)
    assert "read bandwidth" in text and "GB/s" in text and "TFLOPS" in text
    assert "int4_g32" in text


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_doctor_arguments(parser)
    return parser.parse_args(argv)


def test_run_doctor_prints_json(monkeypatch, capsys, quick_report):
    monkeypatch.setattr(doctor, "doctor_report", lambda model_path, quick: quick_report)
    assert run_doctor(_parse(["--json", "--quick"])) == 0
    assert json.loads(capsys.readouterr().out)["bandwidth_gbs"] == quick_report["bandwidth_gbs"]


def test_run_doctor_reports_bad_model_path(tmp_path, capsys):
    assert run_doctor(_parse(["--model", str(tmp_path / "missing"), "--quick"])) == 1
    assert "does not exist" in capsys.readouterr().err
