"""`AGENTCPU_STEP_LOG`: one JSON line per engine step, for reading a served run's time."""

from __future__ import annotations

import json

import pytest

from agentcpu.engine.llm_engine import STEP_LOG_ENV
from tests.engine.helpers import greedy, make_engine, random_prompts, run_all


@pytest.fixture(scope="module")
def path(checkpoint_dir):
    return checkpoint_dir("llama")


def test_each_step_is_logged_with_its_tokens(path, tmp_path, monkeypatch):
    log = tmp_path / "steps.jsonl"
    monkeypatch.setenv(STEP_LOG_ENV, str(log))
    engine = make_engine(path, max_num_batched_tokens=64)
    run_all(engine, random_prompts(2, [100, 30], seed=1), greedy(4))
    steps = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(steps) == engine.stats.steps
    assert sum(s["prefill"] + s["decodes"] for s in steps) == engine.stats.computed_tokens
    # the first step spends the whole budget on the first prompt; the second waits
    assert steps[0]["prefill"] == 64 and steps[0]["waiting"] == 1 and steps[0]["decodes"] == 0
    assert all(s["s"] > 0 and s["free_blocks"] >= 0 for s in steps)
    assert [s["t"] for s in steps] == sorted(s["t"] for s in steps)


def test_no_log_without_the_variable(path, monkeypatch):
    monkeypatch.delenv(STEP_LOG_ENV, raising=False)
    assert make_engine(path).step_log is None
