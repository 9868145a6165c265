"""The offline engine benchmarks measure what they say: a follow-up turn computes only
its new tokens, and decode counts every stream's tokens."""

from __future__ import annotations

import pytest

from agentcpu.bench import offline
from tests.engine.helpers import make_engine


@pytest.fixture(scope="module")
def engine(checkpoint_dir):
    return make_engine(checkpoint_dir("qwen2"))


def test_follow_up_prefills_only_the_new_tokens(engine):
    # a 64-token context is 4 whole KV blocks: all of it comes from the prefix cache
    result = offline.follow_up(engine, 64, 20, seed=5)
    assert result["computed_tokens"] == 20
    assert result["new_tok_s"] == pytest.approx(20 / result["ttft_s"])
    assert not engine.has_unfinished()


def test_decode_reports_aggregate_throughput(engine):
    result = offline.decode(engine, streams=3, prompt_len=8, output_len=5, seed=1)
    assert result["streams"] == 3
    assert result["decode_tok_s"] > 0 and result["output_tok_s"] > 0
    assert not engine.has_unfinished()
