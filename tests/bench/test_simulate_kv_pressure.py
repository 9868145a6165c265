"""The pressure variant replayed through the real engine step (faked forward, simulated
time): with the disk spill store, no follow-up turn recomputes history, even when the
pool holds only half of the sessions' contexts. This also keeps the simulator itself
(`benchmarks/simulate_kv_pressure.py`) working as the engine changes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "simulate_kv_pressure.py"
BLOCK = 16


@pytest.fixture(scope="module")
def simulator():
    spec = importlib.util.spec_from_file_location("simulate_kv_pressure", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


# what a follow-up turn appends (BENCH.md agent-pressure: a 48-token tool call, the
# simulator's template tokens, a 300-token tool result)
NEW_TOKENS = 48 + 4 + 300


def test_follow_ups_compute_only_their_new_tokens_under_pressure(simulator):
    sim = simulator.simulate(sessions=64)
    assert sorted(sim.per_turn) == [1, 2, 3, 4, 5, 6]
    assert all(len(v) == 64 for v in sim.per_turn.values())
    pins = sim.engine.kv.pins.stats
    assert pins.released_pressure > 0  # the pool really was short
    assert sim.engine.kv.spill.restored_blocks > 0
    for turn in range(2, 7):
        # at most the new tokens and the partly filled block before them (whole blocks
        # come back from disk; a released pin's partial block does not)
        assert max(sim.per_turn[turn]) <= NEW_TOKENS + BLOCK, turn


def test_without_the_store_released_sessions_recompute_their_history(simulator):
    sim = simulator.simulate(sessions=16, spill=False)
    assert sim.engine.kv.pins.stats.released_pressure > 0
    assert max(sim.per_turn[6]) > 1_000  # the session's whole history, not ~350 tokens
