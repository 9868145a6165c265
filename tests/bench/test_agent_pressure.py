"""The pressure variant of the agent workload sizes the KV budget from the workload."""

import json

import pytest

from agentcpu.bench.workloads import final_context_tokens, load_workload, pressure_kv_cache_gib
from agentcpu.commands import bench_serve


def test_final_context_of_the_builtin_agent_session():
    spec = load_workload("agent")
    # prefix + task + 5 x (call + result) + final answer
    assert final_context_tokens(spec) == 1800 + 150 + 5 * (48 + 300) + 128


def test_pressure_budget_holds_half_of_all_contexts_with_the_prefix_once():
    spec = load_workload("agent-pressure")
    assert spec.sessions == 64
    per_token = 12 * 1024
    gib = pressure_kv_cache_gib(spec, per_token)
    tokens = 1800 + 64 * (final_context_tokens(spec) - 1800)
    assert gib == pytest.approx(0.5 * tokens * per_token / 2**30)


def test_kv_bytes_per_token_from_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "num_attention_heads": 14, "num_key_value_heads": 2, "hidden_size": 896,
        "num_hidden_layers": 24}))  # the Qwen2.5-0.5B shape
    assert bench_serve._kv_bytes_per_token(tmp_path) == 2 * 24 * 2 * 64 * 2
