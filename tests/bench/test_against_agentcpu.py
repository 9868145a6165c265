"""The harness against a real `agentcpu serve` on a tiny random model (subprocess)."""

from __future__ import annotations

import asyncio
import sys

import pytest
from tokenizers import Tokenizer

from agentcpu.bench.compare import calibrate_prefill
from agentcpu.bench.loadgen import ServerCaps, run_level
from agentcpu.bench.metrics import summarize
from agentcpu.bench.server_process import Launch, free_port, running_server
from agentcpu.bench.workloads import load_workload, spec_from_dict
from tests.models.reference import make_checkpoint
from tests.tokenizer.fixtures import make_bpe_tokenizer_dir

pytest.importorskip("transformers")
READY_TIMEOUT_S = 300.0
TOKEN_RANGE = [100, 600]  # ordinary tokens of the test tokenizer (~730 ids)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny qwen2 checkpoint whose vocabulary matches the test BPE tokenizer."""
    root = tmp_path_factory.mktemp("agentcpu-bench")
    vocab = Tokenizer.from_file(
        str(make_bpe_tokenizer_dir(root / "tok") / "tokenizer.json")
    ).get_vocab_size()
    model = make_checkpoint(root / "model", "qwen2", vocab_size=vocab, max_position_embeddings=1024)
    make_bpe_tokenizer_dir(model)  # after save_pretrained: its generation_config.json wins
    assert TOKEN_RANGE[1] < vocab
    return model


@pytest.fixture(scope="module")
def agentcpu_server(tiny_model, tmp_path_factory):
    port = free_port()
    argv = [sys.executable, "-m", "agentcpu.cli", "serve", "--model", str(tiny_model), "--port", str(port),
            "--threads", "1", "--kv-cache-gb", "0.25", "--max-model-len", "1024", "--log-level", "warning"]  # fmt: skip
    log = tmp_path_factory.mktemp("logs") / "agentcpu.log"
    with running_server("agentcpu", Launch(argv, port), log, READY_TIMEOUT_S) as server:
        yield server


def test_concurrency_workload_of_four_requests(agentcpu_server):
    spec = load_workload(
        "concurrency",
        {"concurrency": [4], "prompt_len": 16, "output_len": 8, "token_range": TOKEN_RANGE},
    )
    outcome = asyncio.run(run_level(agentcpu_server.base_url, spec, spec.levels()[0], seed=1))
    m = summarize(outcome.results, outcome.wall_s)
    assert (m["requests"], m["ok"], m["errors"]) == (4, 4, 0), [r.detail for r in outcome.results]
    assert m["output_tokens"] == 32 and m["length_mismatches"] == 0 and m["usage_missing"] == 0
    assert m["prompt_tokens"] == 64 and m["cached_share"] is not None
    assert m["ttft_s"]["n"] == 4 and m["ttft_s"]["p50"] > 0 and m["output_tok_s"] > 0


def _tiny_agent_spec():
    return spec_from_dict({
        "name": "agent-tiny", "kind": "sessions", "sessions": 2, "turns": 3, "shared_prefix_len": 64,
        "task_len": 16, "tool_call_len": 4, "tool_result_len": 32, "final_answer_len": 8,
        "tool_pause": {"median_s": 0.05, "sigma": 0.5}, "concurrency": [2], "token_range": TOKEN_RANGE,
    })  # fmt: skip


def test_prefill_calibration_times_one_follow_up_sized_prompt(agentcpu_server):
    calibration = calibrate_prefill(agentcpu_server, _tiny_agent_spec(), ServerCaps())
    # context: 64 prefix + 16 task + 1 follow-up of 4 + 32 = 116 tokens, cached by the
    # first request up to its last full 16-token block (112); the second computes the
    # rest and its own 36 new tokens
    assert calibration["context"] == 116 and calibration["tokens"] == 36 + 4
    assert calibration["ttft_s"] > 0
    plain = load_workload("concurrency", {"concurrency": [1], "token_range": TOKEN_RANGE})
    assert calibrate_prefill(agentcpu_server, plain, ServerCaps()) is None


def test_agent_sessions_reuse_the_cached_history(agentcpu_server):
    spec = _tiny_agent_spec()
    outcome = asyncio.run(run_level(agentcpu_server.base_url, spec, spec.levels()[0], seed=2))
    m = summarize(outcome.results, outcome.wall_s)
    assert (m["ok"], m["errors"], m["length_mismatches"]) == (6, 0, 0), m["errors_by_status"]
    assert sorted(m["per_turn_ttft_s"]) == [1, 2, 3]
    # turns 2 and 3 resend the previous prompt: the prefix cache must cover most of it
    later = [r for r in outcome.results if r.turn > 1]
    assert all(r.cached_tokens and r.cached_tokens >= 64 for r in later)
    assert m["cached_share"] > 0.3
