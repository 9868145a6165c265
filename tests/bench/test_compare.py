"""`bench compare` plumbing (server lifecycle, peak RSS, rounds) and the two commands,
with the stub OpenAI server standing in for the engines."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import pytest

from agentcpu.bench import compare as compare_mod
from agentcpu.bench.compare import (
    CompareError,
    CompareOptions,
    Engine,
    max_in_flight,
    round_order,
)
from agentcpu.bench.loadgen import ServerCaps
from agentcpu.bench.progress import LiveProgress
from agentcpu.bench.server_process import (
    Launch,
    RssSampler,
    ServerStartError,
    free_port,
    process_tree,
    running_server,
)
from agentcpu.bench.workloads import load_workload, spec_from_dict
from agentcpu.commands import bench_serve
from tests.bench.stub_openai import Behaviour, StubServer

BALLAST_MB = 64
READY_TIMEOUT_S = 60.0
TINY = {"name": "tiny", "prompt_len": 8, "output_len": 3, "concurrency": [1, 2]}


def _stub_launch(port: int, ballast_mb: int = 0) -> Launch:
    argv = [
        sys.executable,
        "-m",
        "tests.bench.stub_openai",
        "--port",
        str(port),
        "--ballast-mb",
        str(ballast_mb),
    ]
    return Launch(argv, port)


def test_round_order_rotates():
    engines = ("a", "b", "c")
    assert [round_order(engines, r) for r in range(4)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"],
    ]  # fmt: skip


def test_max_in_flight():
    assert max_in_flight(load_workload("concurrency")) == 64
    assert max_in_flight(load_workload("agent")) == 16
    assert max_in_flight(spec_from_dict({"name": "r", "arrival_rate": 5, "num_requests": 7})) == 7


def test_process_tree_and_rss_of_children():
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; b = bytearray(48 << 20); time.sleep(30)"]
    )
    try:
        time.sleep(1.0)
        import os

        assert child.pid in process_tree(os.getpid())
        sampler = RssSampler(os.getpid(), interval_s=0.05).start()
        time.sleep(0.2)
        figures = sampler.stop()
        assert figures["peak_rss_mb"] >= 48 and figures["peak_rss_sampled_mb"] >= 48
    finally:
        child.kill()
        child.wait()


def test_running_server_waits_tracks_rss_and_stops(tmp_path):
    port = free_port()
    with running_server(
        "stub", _stub_launch(port, BALLAST_MB), tmp_path / "stub.log", READY_TIMEOUT_S
    ) as server:
        assert server.ready_s > 0 and server.process.poll() is None
        process = server.process
    assert process.poll() is not None
    assert server.figures["peak_rss_mb"] >= BALLAST_MB
    assert (tmp_path / "stub.log").read_text().startswith("$ ")


def test_server_that_exits_fails_with_its_log(tmp_path):
    launch = Launch(
        [sys.executable, "-c", "print('boom: bad flag'); raise SystemExit(3)"], free_port()
    )
    with pytest.raises(ServerStartError, match="boom: bad flag"):
        with running_server("broken", launch, tmp_path / "broken.log", READY_TIMEOUT_S):
            pass


def test_compare_alternates_engines_and_writes_report(tmp_path, monkeypatch):
    def launcher(ballast):
        return lambda options, context, port: _stub_launch(port, ballast)

    engines = {
        "slow": Engine("slow", ServerCaps(), lambda o: {}, launcher(BALLAST_MB)),
        "fast": Engine("fast", ServerCaps(), lambda o: {}, launcher(0)),
    }
    monkeypatch.setattr(compare_mod, "ENGINES", engines)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    options = CompareOptions(
        spec=spec_from_dict(TINY), model=model, engines=("slow", "fast"), baseline="slow", rounds=2,
        out_dir=tmp_path / "out", ready_timeout_s=READY_TIMEOUT_S, doctor=False, command="test",
    )  # fmt: skip
    record, written = compare_mod.compare(options, LiveProgress(enabled=False))
    out_dir = tmp_path / "out"
    assert {p.name for p in written} == {
        "results.json",
        "results.md",
        "throughput_vs_load.png",
        "ttft_cdf.png",
    }
    for name in ("slow", "fast"):
        entry = record["engines"][name]
        assert [(r["round"], r["label"]) for r in entry["runs"]] == [
            (0, "c=1"),
            (0, "c=2"),
            (1, "c=1"),
            (1, "c=2"),
        ]
        assert all(r["metrics"]["errors"] == 0 and r["metrics"]["output_tokens"] == 3 * r["concurrency"]
                   for r in entry["runs"])  # fmt: skip
        assert len(entry["servers"]) == 2
    assert min(s["peak_rss_mb"] for s in record["engines"]["slow"]["servers"]) >= BALLAST_MB
    logs = sorted(p.name for p in (out_dir / "logs").iterdir())
    assert logs == ["fast-round1.log", "fast-round2.log", "slow-round1.log", "slow-round2.log"]
    saved = json.loads((out_dir / "results.json").read_text())
    assert saved["baseline"] == "slow" and len(saved["engines"]["fast"]["runs"]) == 4
    assert (out_dir / "results.md").is_file() and (out_dir / "ttft_cdf.png").is_file()


def test_compare_options_are_checked(tmp_path):
    spec = spec_from_dict(TINY)
    with pytest.raises(CompareError, match="no config.json"):
        CompareOptions(spec=spec, model=tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CompareError, match="unknown engines"):
        CompareOptions(spec=spec, model=tmp_path, engines=("nope",))
    with pytest.raises(CompareError, match="baseline"):
        CompareOptions(spec=spec, model=tmp_path, engines=("agentcpu",), baseline="vllm")


def test_bench_serve_command_against_the_stub(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bench_serve.add_serve_arguments(parser)
    with StubServer(Behaviour(cached_fraction=0.5)) as stub:
        args = parser.parse_args([
            "--base-url", stub.base_url, "--workload", "concurrency", "--set", "concurrency=[2]",
            "--set", "output_len=4", "--set", "prompt_len=16", "--label", "stub", "--rounds", "2",
            "--out", str(tmp_path), "--no-progress",
        ])  # fmt: skip
        assert bench_serve.run_serve(args) == 0
        assert len(stub.state.bodies) == 4
    table = capsys.readouterr().out
    assert "| stub | c=2 | 2 |" in table and "| 50.0 |" in table
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["base_url"] == stub.base_url and record["spec"]["output_len"] == 4


def test_bench_serve_exits_1_on_errors(tmp_path):
    parser = argparse.ArgumentParser()
    bench_serve.add_serve_arguments(parser)
    with StubServer(Behaviour(fail_every={503: 2})) as stub:
        args = parser.parse_args(["--base-url", stub.base_url, "--workload", "concurrency",
                                  "--set", "concurrency=[2]", "--set", "output_len=2", "--no-progress"])  # fmt: skip
        assert bench_serve.run_serve(args) == 1


def test_compare_arguments_parse():
    parser = argparse.ArgumentParser()
    bench_serve.add_compare_arguments(parser)
    args = parser.parse_args(["--workload", "agent", "--shape", "qwen2.5-0.5b", "--engines", "agentcpu,vllm",
                              "--llamacpp-args", "-no-kvu --foo 1"])  # fmt: skip
    assert args.shape == "qwen2.5-0.5b" and args.llamacpp_args == "-no-kvu --foo 1"
    with pytest.raises(SystemExit):
        parser.parse_args(["--workload", "agent"])  # neither --model nor --shape
