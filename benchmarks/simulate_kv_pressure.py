"""Replay an agent workload through the real scheduler, KV manager, pins and disk spill
store, with the forward pass faked and time simulated, to count the prompt tokens each
turn computes.

The served pressure benchmark takes ~25 minutes on 2 cores; this takes seconds and
reproduces its per-turn recompute (session 17: 161.6k prompt tokens computed here
against 157.1k served, the same turn-5/6 tail of whole-history recomputes), so a change
to admission, eviction, pinning or restoring can be judged before the served run.

What is real: `LLMEngine.step` with its scheduler, `KVCacheManager`, `SessionPins`
(on a virtual clock) and `DiskKVStore` (writing real files), the BENCH.md workload from
`agentcpu.bench.workloads`, and the KV pool's size in tokens (the pressure budget of the
Qwen2.5-0.5B shape). What is not: the model (a tiny random checkpoint whose forward is
replaced by a token draw), and time: each step advances the clock by
`--step-ms + --token-ms x computed tokens` (defaults fit 2 Zen 3 cores, bf16), and a
session's next turn arrives its drawn tool pause after its last one ends.

Usage: python benchmarks/simulate_kv_pressure.py [--sessions 64] [--no-spill]
(`simulate()` from Python; `tests/bench/test_simulate_kv_pressure.py` runs it.)
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import heapq
import json
import random
import statistics
import tempfile
from pathlib import Path

from agentcpu.bench.checkpoints import get_shape, hf_config, make_random_checkpoint
from agentcpu.bench.workloads import build_jobs, load_workload, pressure_kv_cache_gib
from agentcpu.engine.llm_engine import LLMEngine
from agentcpu.engine.sampler import SampleResult
from agentcpu.engine.sampling_params import SamplingParams
from agentcpu.hardware.roofline import KV_BYTES_PER_ELEMENT, kv_bytes_per_token
from agentcpu.models.loading import resolve_engine_config

REAL_SHAPE = "qwen2.5-0.5b"  # the served benchmark's model: its KV budget in tokens
TEMPLATE_TOKENS = 4  # what a chat template adds around a tool result (approximate)


@dataclasses.dataclass
class Simulation:
    """What a replay computed: prompt tokens computed by each request, per turn (1-based),
    the simulated wall time, and the engine (its counters, pins and spill store)."""

    per_turn: dict[int, list[int]]
    wall_s: float
    engine: LLMEngine


def simulate(
    sessions: int = 64,
    spill: bool = True,
    workload: str = "agent-pressure",
    pin_ttl_s: float = 5.0,
    step_ms: float = 40.0,
    token_ms: float = 5.0,
) -> Simulation:
    """Replay `workload` with `sessions` sessions against the pressure KV budget."""
    spec = load_workload(workload, {"sessions": sessions, "concurrency": [sessions]})
    jobs = build_jobs(spec, sessions)
    real_bytes = kv_bytes_per_token(hf_config(get_shape(REAL_SHAPE), "bfloat16"))
    kv_tokens = pressure_kv_cache_gib(spec, real_bytes) * 2**30 / real_bytes
    with tempfile.TemporaryDirectory() as tmp:
        engine = _engine(Path(tmp), kv_tokens, spill)
        per_turn, wall = _replay(engine, jobs, pin_ttl_s, step_ms / 1e3, token_ms / 1e3)
    return Simulation(per_turn, wall, engine)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="agent-pressure")
    parser.add_argument("--sessions", type=int, default=64)
    parser.add_argument("--pin-ttl", type=float, default=5.0, help="seconds (virtual)")
    parser.add_argument("--step-ms", type=float, default=40.0)
    parser.add_argument("--token-ms", type=float, default=5.0)
    parser.add_argument("--no-spill", action="store_true", help="no disk spill store")
    args = parser.parse_args()
    sim = simulate(
        args.sessions, not args.no_spill, args.workload, args.pin_ttl, args.step_ms, args.token_ms
    )
    _report(sim.engine, sim.per_turn, sim.wall_s)


def _engine(tmp: Path, kv_tokens: float, spill: bool) -> LLMEngine:
    """An fp32 tiny-model engine whose KV pool holds `kv_tokens` tokens."""
    shape = dataclasses.replace(get_shape("tiny-qwen2"), max_position_embeddings=16384)
    path = make_random_checkpoint("tiny-qwen2", tmp / "model", dtype="float32")
    (path / "config.json").write_text(json.dumps(hf_config(shape, "float32")))
    fp32_bytes = kv_bytes_per_token(hf_config(shape, "float32")) * 4 // KV_BYTES_PER_ELEMENT
    config = resolve_engine_config(
        str(path),
        dtype="float32",
        max_model_len=16384,
        kv_cache_gb=kv_tokens * fp32_bytes / 2**30,
        spill_gb=4.0 if spill else 0.0,
        spill_dir=str(tmp / "spill"),
    )
    engine = LLMEngine(config)
    draw = random.Random(1)

    def fake_execute(scheduled):
        return {
            s.request.request_id: SampleResult(draw.randrange(600, 900), None, None)
            for s in scheduled
            if s.samples
        }

    engine.runner.execute = fake_execute
    return engine


def _replay(
    engine: LLMEngine, jobs, pin_ttl_s: float, step_s: float, token_s: float
) -> tuple[dict[int, list[int]], float]:
    clock = [0.0]
    engine.kv.pins.clock = lambda: clock[0]
    history = {job.session: (list(job.first_prompt), 0) for job in jobs}
    arrivals = [(0.0, job.session) for job in jobs]
    heapq.heapify(arrivals)
    live = {}
    per_turn: dict[int, list[int]] = collections.defaultdict(list)
    while arrivals or engine.has_unfinished():
        while arrivals and arrivals[0][0] <= clock[0]:
            _, session = heapq.heappop(arrivals)
            tokens, turn = history[session]
            params = SamplingParams(
                max_tokens=jobs[session].turns[turn].max_tokens, ignore_eos=True, temperature=0
            )
            request = engine.add_request(
                tokens, params, session_id=f"s{session}", pin_ttl_s=pin_ttl_s
            )
            live[request.request_id] = (session, request)
        if not engine.has_unfinished():
            clock[0] = arrivals[0][0]
            continue
        before = engine.stats.computed_tokens
        outputs = engine.step()
        clock[0] += step_s + token_s * (engine.stats.computed_tokens - before)
        for out in outputs:
            if not out.finished:
                continue
            session, request = live.pop(out.request_id)
            tokens, turn = history[session]
            per_turn[turn + 1].append(len(tokens) - request.num_cached_tokens)
            spec_turn = jobs[session].turns[turn]
            if turn + 1 < len(jobs[session].turns):
                # the client sends back its own rendering of the reply, not the sampled ids
                tokens = tokens + spec_turn.synthetic_output + [5] * TEMPLATE_TOKENS
                history[session] = (tokens + spec_turn.tool_result, turn + 1)
                heapq.heappush(arrivals, (clock[0] + spec_turn.pause_s, session))
    return per_turn, clock[0]


def _report(engine: LLMEngine, per_turn: dict[int, list[int]], wall: float) -> None:
    print(f"KV pool {engine.kv.pool.num_blocks} blocks; simulated wall {wall:.0f} s")
    print("pins:", vars(engine.kv.pins.stats))
    if engine.kv.spill is not None:
        store = engine.kv.spill
        print(f"spill: {store.spilled_blocks} blocks written, {store.restored_blocks} restored")
    print("turn  requests  computed: median  mean  p90  max")
    total = 0
    for turn in sorted(per_turn):
        values = sorted(per_turn[turn])
        total += sum(values)
        p90 = values[int(0.9 * len(values))]
        print(
            f"{turn:>4}  {len(values):>8}  {statistics.median(values):>16.0f}"
            f"  {statistics.mean(values):>4.0f}  {p90:>3}  {values[-1]}"
        )
    print(f"prompt tokens computed: {total}")


if __name__ == "__main__":
    main()
