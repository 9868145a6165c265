"""The load generator against an in-test stub server with known timings and usage.

Timing assertions are one-sided where the stub's sleeps make a strict lower bound, with a
generous upper slack for a loaded machine; token counts and shares are exact.
"""

from __future__ import annotations

import asyncio

import pytest

from agentcpu.bench.loadgen import (
    Limits,
    LoadgenError,
    ServerCaps,
    check_base_url,
    is_loopback,
    run_level,
)
from agentcpu.bench.metrics import summarize
from agentcpu.bench.workloads import (
    LengthDist,
    SessionJob,
    WorkloadError,
    build_jobs,
    load_workload,
    parse_overrides,
    spec_from_dict,
)
from tests.bench.stub_openai import Behaviour, StubServer

SLACK_S = 0.3  # scheduling delay allowed on a busy 2-core machine
EPS_S = 0.002  # timer granularity


@pytest.fixture(scope="module")
def stub():
    with StubServer() as server:
        yield server


def _run(stub, spec, behaviour, seed=0, **kwargs):
    stub.state.reset(behaviour)
    level = spec.levels()[0]
    return asyncio.run(run_level(stub.base_url, spec, level, seed, **kwargs))


def _requests_spec(**fields):
    return spec_from_dict(
        {"name": "t", "prompt_len": 40, "output_len": 6, "concurrency": [2], **fields}
    )


def test_closed_loop_timings_tokens_and_cached_share(stub):
    behaviour = Behaviour(ttft_s=0.1, itl_s=0.02, cached_fraction=0.25)
    outcome = _run(stub, _requests_spec(num_requests=6), behaviour)
    m = summarize(outcome.results, outcome.wall_s)
    assert (m["requests"], m["ok"], m["errors"], m["errors_by_status"]) == (6, 6, 0, {})
    assert m["prompt_tokens"] == 240 and m["output_tokens"] == 36
    assert m["cached_tokens"] == 60 and m["cached_share"] == pytest.approx(0.25)
    assert m["length_mismatches"] == 0 and m["usage_missing"] == 0
    for key in ("p50", "p95", "p99"):
        assert 0.1 - EPS_S <= m["ttft_s"][key] <= 0.1 + SLACK_S
    assert 0.02 - EPS_S <= m["tpot_s"]["p50"] <= 0.02 + SLACK_S / 5
    assert m["itl_s"]["n"] == 6 * 5 and m["itl_s"]["p50"] >= 0.02 - EPS_S
    # 6 requests, 2 at a time: 3 waves of >= 0.1 + 5 x 0.02 s
    assert 0.6 - EPS_S <= outcome.wall_s <= 0.6 + 3 * SLACK_S
    assert m["output_tok_s"] == pytest.approx(36 / outcome.wall_s)
    assert m["processed_tok_s"] == pytest.approx(276 / outcome.wall_s)
    assert m["computed_tok_s"] == pytest.approx((276 - 60) / outcome.wall_s)
    assert m["requests_per_s"] == pytest.approx(6 / outcome.wall_s)
    assert outcome.model == "stub-model" and not outcome.truncated


def test_requests_force_lengths_and_ask_for_usage(stub):
    _run(stub, _requests_spec(num_requests=2), Behaviour())
    for body in stub.state.bodies:
        assert body["max_tokens"] == body["min_tokens"] == 6 and body["ignore_eos"] is True
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert len(body["prompt"]) == 40 and all(300 <= t < 900 for t in body["prompt"])
        assert body["model"] == "stub-model" and body["temperature"] == 0.0
    assert stub.state.bodies[0]["prompt"] != stub.state.bodies[1]["prompt"]


def test_without_fixed_length_support_nothing_is_forced(stub):
    _run(stub, _requests_spec(num_requests=1), Behaviour(), caps=ServerCaps(fixed_length=False))
    assert "ignore_eos" not in stub.state.bodies[0] and "min_tokens" not in stub.state.bodies[0]


def test_short_outputs_are_counted_as_length_mismatches(stub):
    outcome = _run(stub, _requests_spec(num_requests=4), Behaviour(short_by=2))
    m = summarize(outcome.results)
    assert m["length_mismatches"] == 4 and m["output_tokens"] == 4 * 4 and m["errors"] == 0


def test_errors_are_counted_by_status(stub):
    outcome = _run(stub, _requests_spec(num_requests=12, concurrency=[1]),
                   Behaviour(fail_every={429: 3, 500: 4}))  # fmt: skip
    m = summarize(outcome.results)
    # request numbers 3, 6, 9, 12 -> 429; 4, 8 -> 500
    assert m["errors_by_status"] == {"429": 4, "500": 2}
    assert (m["ok"], m["errors"], m["output_tokens"]) == (6, 6, 36)
    failed = [r for r in outcome.results if not r.ok]
    assert all(r.error == "http" and "stub" in r.detail for r in failed)


def test_unreported_cache_is_none_not_zero(stub):
    outcome = _run(stub, _requests_spec(num_requests=2), Behaviour(report_cached=False))
    m = summarize(outcome.results)
    assert m["cached_share"] is None and m["computed_tok_s"] is None


def test_agent_sessions_grow_history_and_time_each_turn(stub):
    spec = spec_from_dict({
        "name": "agent-small", "kind": "sessions", "sessions": 2, "turns": 3,
        "shared_prefix_len": 40, "task_len": 10, "tool_call_len": 4, "tool_result_len": 20,
        "final_answer_len": 6, "tool_pause": {"median_s": 0.05, "sigma": 0.0}, "concurrency": [2],
    })  # fmt: skip
    behaviour = Behaviour(ttft_s=0.02, ttft_per_prompt_token_s=0.002, cached_fraction=0.5)
    outcome = _run(stub, spec, behaviour, seed=5)
    m = summarize(outcome.results, outcome.wall_s)
    assert (m["requests"], m["ok"]) == (6, 6)
    expected_prompt = {1: 50, 2: 74, 3: 98}
    for turn, dist in m["per_turn_ttft_s"].items():
        known = 0.02 + 0.002 * expected_prompt[turn]
        assert dist["n"] == 2 and known - EPS_S <= dist["p50"] <= known + SLACK_S
    assert m["output_tokens"] == 2 * (4 + 4 + 6)
    # the history each turn sends: previous prompt + the call's (pre-drawn) ids + tool result
    jobs = build_jobs(spec, spec.levels()[0], seed=5)
    prompts = {(r.session, r.turn): r.prompt_tokens for r in outcome.results}
    assert prompts == {(s, t): expected_prompt[t] for s in (0, 1) for t in (1, 2, 3)}
    by_prompt = {tuple(body["prompt"]) for body in stub.state.bodies}
    # each session's turns name it in OpenAI's `user` field (engines that key sessions on it)
    assert {body["user"] for body in stub.state.bodies} == {"bench-session-0", "bench-session-1"}
    for job in jobs:
        assert isinstance(job, SessionJob)
        history = job.first_prompt
        for turn in job.turns:
            assert tuple(history) in by_prompt
            history = history + turn.synthetic_output + turn.tool_result
    assert jobs[0].first_prompt[:40] == jobs[1].first_prompt[:40]
    assert jobs[0].first_prompt[40:] != jobs[1].first_prompt[40:]
    # every turn after the first starts at least one tool pause after its predecessor ended
    for session in (0, 1):
        turns = sorted((r for r in outcome.results if r.session == session), key=lambda r: r.turn)
        for earlier, later in zip(turns, turns[1:], strict=False):
            assert later.start_s - earlier.end_s >= 0.05 - EPS_S


def test_request_budget_bounds_the_run(stub):
    outcome = _run(
        stub, _requests_spec(num_requests=10), Behaviour(), limits=Limits(max_requests=3)
    )
    assert len(outcome.results) == 3 and outcome.truncated


def test_deadline_cancels_in_flight_requests(stub):
    outcome = _run(stub, _requests_spec(num_requests=4), Behaviour(ttft_s=5.0),
                   limits=Limits(max_duration_s=0.3))  # fmt: skip
    assert outcome.truncated and outcome.wall_s < 2.0
    assert len(outcome.results) == 2
    assert {r.error for r in outcome.results} == {"deadline"}
    assert summarize(outcome.results)["errors_by_status"] == {"deadline": 2}


def test_arrival_rate_spreads_request_starts(stub):
    spec = spec_from_dict({"name": "open", "prompt_len": 8, "output_len": 2, "arrival_rate": 40,
                           "num_requests": 8})  # fmt: skip
    outcome = _run(stub, spec, Behaviour())
    starts = sorted(r.start_s for r in outcome.results)
    assert len(starts) == 8 and all(r.ok for r in outcome.results)
    assert starts[-1] - starts[0] > 0.02  # 7 exponential gaps of mean 25 ms
    assert spec.levels()[0].label == "rate=40/s"


def test_base_url_checks():
    assert check_base_url("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000"
    assert check_base_url("https://example.com/api") == "https://example.com/api"
    for bad in ("ftp://127.0.0.1", "127.0.0.1:8000", "http://127.0.0.1:8000/?q=1"):
        with pytest.raises(LoadgenError):
            check_base_url(bad)
    assert is_loopback("http://127.0.0.1:1") and is_loopback("http://localhost:1")
    assert is_loopback("http://[::1]:1") and not is_loopback("http://10.0.0.1:1")


def test_unreachable_server_is_a_clear_error():
    spec = _requests_spec(num_requests=1)
    with pytest.raises(LoadgenError, match="v1/models"):
        asyncio.run(run_level("http://127.0.0.1:9", spec, spec.levels()[0], 0))


# ---- workloads -----------------------------------------------------------------------


def test_builtin_workloads_follow_bench_md():
    concurrency = load_workload("concurrency")
    assert [level.concurrency for level in concurrency.levels()] == [1, 4, 16, 32, 64]
    jobs = build_jobs(concurrency, concurrency.levels()[2], seed=1)
    assert len(jobs) == 16 and {(len(j.prompt), j.max_tokens) for j in jobs} == {(128, 256)}
    agent = load_workload("agent")
    (session, *_) = build_jobs(agent, agent.levels()[0], seed=1)
    assert len(session.first_prompt) == 1800 + 150 and len(session.turns) == 6
    assert [t.max_tokens for t in session.turns] == [48] * 5 + [128]
    assert all(len(t.tool_result) == 300 and t.pause_s > 0 for t in session.turns[:-1])
    final_prompt = 1950 + 5 * (48 + 300)
    assert final_prompt + 128 <= 4096  # fits vLLM's and llama.cpp's 4,096-token context


def test_jobs_are_deterministic_per_seed():
    spec = load_workload("agent")
    level = spec.levels()[0]
    assert build_jobs(spec, level, seed=3) == build_jobs(spec, level, seed=3)
    assert build_jobs(spec, level, seed=3) != build_jobs(spec, level, seed=4)


def test_custom_spec_file_and_overrides(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "kind: requests\nprompt_len: {uniform: [10, 20]}\noutput_len: {choice: [4, 8]}\n"
        "shared_prefix_len: 5\nconcurrency: [1, 2]\nrequests_per_stream: 3\n"
    )
    spec = load_workload(str(path), parse_overrides(["concurrency=[3]", "seed=9"]))
    assert (
        spec.name == "mine" and spec.seed == 9 and [lv.concurrency for lv in spec.levels()] == [3]
    )
    jobs = build_jobs(spec, spec.levels()[0])
    assert len(jobs) == 9 and all(
        15 <= len(j.prompt) <= 25 and j.max_tokens in (4, 8) for j in jobs
    )
    assert len({tuple(j.prompt[:5]) for j in jobs}) == 1
    json_path = tmp_path / "rate.json"
    json_path.write_text(
        '{"arrival_rate": [1, 2], "num_requests": 4, "output_len": {"lognormal": {"median": 8, "sigma": 0.5}}}'
    )
    rate = load_workload(str(json_path))
    assert [lv.label for lv in rate.levels()] == ["rate=1/s", "rate=2/s"]


@pytest.mark.parametrize(
    "value, typical",
    [(300, 300), ({"uniform": [300, 900]}, 600), ({"choice": [4, 8, 32]}, 8),
     ({"lognormal": {"median": 48, "sigma": 0.8}}, 48)],
)
def test_typical_length_is_the_middle_of_each_distribution(value, typical):
    assert LengthDist.parse(value, "x").typical() == typical


@pytest.mark.parametrize(
    "fields",
    [
        {"prompt_len": 0},
        {"prompt_len": {"uniform": [9, 3]}},
        {"kind": "batch"},
        {"concurrency": [0]},
        {"bogus": 1},
        {"arrival_rate": 2},  # no num_requests
        {"tool_pause": {"median_s": -1}},
    ],
)
def test_bad_specs_raise_workload_error(fields):
    with pytest.raises(WorkloadError):
        spec_from_dict({"name": "bad", **fields})


def test_unknown_workload_name():
    with pytest.raises(WorkloadError, match="built-in"):
        load_workload("no-such-workload")
    with pytest.raises(WorkloadError, match="KEY=VALUE"):
        parse_overrides(["novalue"])
