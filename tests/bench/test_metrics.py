"""Metrics from hand-made request records with known values (exact, no timing)."""

from __future__ import annotations

import numpy as np
import pytest

from agentcpu.bench.metrics import (
    RequestResult,
    cached_share,
    cdf,
    distribution,
    errors_by_status,
    follow_up_prefill_ratios,
    median_or_none,
    per_turn_ttft,
    percentile,
    summarize,
    wall_time,
)


def _done(start, ttft, tokens, itl=0.1, prompt=100, cached=None, turn=None, expected=None):
    first = start + ttft
    chunks = [first + i * itl for i in range(tokens)]
    return RequestResult(
        prompt_tokens=prompt, expected_tokens=expected or tokens, start_s=start, end_s=chunks[-1],
        first_token_s=first, chunk_times=chunks, completion_tokens=tokens,
        usage_prompt_tokens=prompt, cached_tokens=cached, status=200, turn=turn,
    )  # fmt: skip


def _failed(status=None, kind="http"):
    return RequestResult(prompt_tokens=100, expected_tokens=10, start_s=0.0, end_s=0.01,
                         status=status, error=kind)  # fmt: skip


@pytest.mark.parametrize("q", [0, 1, 25, 50, 95, 99, 100])
def test_percentile_matches_numpy_linear(q):
    values = [0.3, 0.1, 0.7, 0.2, 0.9, 0.5, 0.4]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_edges():
    assert percentile([], 50) is None
    assert percentile([2.0], 99) == 2.0
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_distribution_skips_missing_values():
    d = distribution([1.0, None, 3.0, 2.0])
    assert (d["p50"], d["mean"], d["max"], d["n"]) == (2.0, 2.0, 3.0, 3)
    assert distribution([])["p50"] is None and distribution([])["n"] == 0


def test_request_result_derived_timings():
    r = _done(start=1.0, ttft=0.5, tokens=5, itl=0.1)
    assert r.ttft_s == pytest.approx(0.5)
    assert r.e2e_s == pytest.approx(0.9)
    assert r.tpot_s == pytest.approx(0.1)
    assert r.itl_s() == pytest.approx([0.1] * 4)
    assert not r.length_mismatch and r.error_key is None
    one = _done(start=0.0, ttft=0.2, tokens=1)
    assert one.tpot_s is None and one.itl_s() == []


def test_output_tokens_fall_back_to_chunks_without_usage():
    r = _done(start=0.0, ttft=0.1, tokens=4)
    r.completion_tokens = None
    assert r.output_tokens == 4


def test_summarize_known_run():
    results = [
        _done(0.0, 0.1, 10, itl=0.05, prompt=100, cached=50),
        _done(0.0, 0.2, 10, itl=0.05, prompt=100, cached=0),
        _done(1.0, 0.3, 10, itl=0.05, prompt=200, cached=100),
        _done(1.0, 0.4, 8, itl=0.05, prompt=200, cached=None, expected=10),
        _failed(429),
        _failed(500),
        _failed(429),
        _failed(kind="transport"),
    ]
    m = summarize(results, wall_s=2.0)
    assert (m["requests"], m["ok"], m["errors"]) == (8, 4, 4)
    assert m["errors_by_status"] == {"429": 2, "500": 1, "transport": 1}
    assert m["prompt_tokens"] == 600 and m["output_tokens"] == 38
    # the cache share counts only requests whose server reported it: 150 / 400
    assert m["cached_tokens"] == 150 and m["cached_share"] == pytest.approx(150 / 400)
    assert m["output_tok_s"] == pytest.approx(19.0)
    assert m["processed_tok_s"] == pytest.approx(319.0)
    assert m["computed_tok_s"] == pytest.approx((638 - 150) / 2.0)
    assert m["requests_per_s"] == pytest.approx(2.0)
    assert m["ttft_s"]["p50"] == pytest.approx(0.25)
    assert m["ttft_s"]["p95"] == pytest.approx(float(np.percentile([0.1, 0.2, 0.3, 0.4], 95)))
    assert m["ttft_s"]["p99"] == pytest.approx(float(np.percentile([0.1, 0.2, 0.3, 0.4], 99)))
    assert m["tpot_s"]["p50"] == pytest.approx(0.05)
    assert m["itl_s"]["n"] == 9 + 9 + 9 + 7
    assert m["length_mismatches"] == 1 and m["usage_missing"] == 0
    assert "per_turn_ttft_s" not in m


def test_summarize_default_wall_is_first_start_to_last_end():
    results = [_done(0.5, 0.1, 3, itl=0.1), _done(1.0, 0.1, 3, itl=0.2)]
    assert wall_time(results) == pytest.approx((1.0 + 0.1 + 0.4) - 0.5)
    assert summarize(results)["wall_s"] == pytest.approx(1.0)
    assert summarize([])["wall_s"] == 0.0 and summarize([])["output_tok_s"] is None


def test_per_turn_ttft_and_cached_share():
    results = [
        _done(0, 0.1, 2, turn=1, cached=0), _done(0, 0.3, 2, turn=1, cached=0),
        _done(1, 0.2, 2, turn=2, cached=90), _done(1, 0.4, 2, turn=2, cached=90),
        _done(2, 0.5, 2, turn=3, cached=95), _failed(500),
    ]  # fmt: skip
    turns = per_turn_ttft(results)
    assert list(turns) == [1, 2, 3]
    assert turns[1]["p50"] == pytest.approx(0.2) and turns[2]["p50"] == pytest.approx(0.3)
    assert turns[3]["n"] == 1 and turns[3]["p99"] == pytest.approx(0.5)
    assert cached_share(results) == pytest.approx(275 / 500)
    assert summarize(results)["per_turn_ttft_s"][2]["n"] == 2


def test_errors_cdf_and_median():
    assert errors_by_status([_failed(503), _failed(kind="deadline"), _failed(503)]) == {
        "503": 2,
        "deadline": 1,
    }
    xs, ys = cdf([0.3, None, 0.1, 0.2])
    assert xs == [0.1, 0.2, 0.3] and ys == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert median_or_none([None, 3.0, 1.0]) == 2.0 and median_or_none([None]) is None


def test_follow_up_prefill_ratios_use_computed_tokens_and_skip_what_cannot_count():
    def rec(turn, ttft, cached, prompt=400, error=None, usage=None):
        return {"turn": turn, "ttft_s": ttft, "cached_tokens": cached, "prompt_tokens": prompt,
                "usage_prompt_tokens": usage, "error": error}  # fmt: skip

    records = [
        rec(1, 5.0, 0),  # first turns are the reference's business, not counted
        rec(2, 1.0, 300),  # 100 computed at 200 tok/s = 0.5 s ideal: 2x
        rec(3, 0.5, 300, usage=500),  # server-counted prompt: 200 computed, 1 s ideal: 0.5x
        rec(4, 1.0, None),  # cached tokens not reported
        rec(5, 1.0, 300, error="http"),
        rec(6, 1.0, 400),  # nothing computed
    ]
    assert follow_up_prefill_ratios(records, 200.0) == pytest.approx([2.0, 0.5])
    assert follow_up_prefill_ratios(records, 0.0) == []
