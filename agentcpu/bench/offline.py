"""Offline engine benchmarks (BENCH.md workloads run through `LLMEngine`, no HTTP).

Each workload forces output lengths (`ignore_eos`), repeats, and reports medians next to
this machine's roofline from `doctor_report`. Token-id prompts are random, so every
engine given the same seed does the same work.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from agentcpu.engine.llm_engine import LLMEngine
from agentcpu.engine.sampling_params import SamplingParams


@dataclass
class StepTimes:
    """Per-request first-token time and finish time, plus step count."""

    first_token: dict[str, float] = field(default_factory=dict)
    finished: dict[str, float] = field(default_factory=dict)
    steps: int = 0


def random_prompt(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    # stay clear of special/padding ids at the top of the vocabulary
    return torch.randint(10, max(11, vocab - 512), (n,), generator=g).tolist()


def run_requests(
    engine: LLMEngine, prompts: list[list[int]], max_tokens: int
) -> tuple[float, StepTimes]:
    """Submit all prompts at once and step until done; returns wall seconds and timings."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    times = StepTimes()
    start = time.perf_counter()
    for p in prompts:
        engine.add_request(p, params)
    while engine.has_unfinished():
        outs = engine.step()
        times.steps += 1
        now = time.perf_counter() - start
        for o in outs:
            times.first_token.setdefault(o.request_id, now)
            if o.finished:
                times.finished[o.request_id] = now
    return time.perf_counter() - start, times


def decode(engine: LLMEngine, streams: int, prompt_len: int, output_len: int, seed: int) -> dict:
    """Aggregate decode tok/s of `streams` concurrent sequences (prefill excluded)."""
    vocab = engine.config.model_config.vocab_size
    prompts = [random_prompt(prompt_len, vocab, seed + i) for i in range(streams)]
    wall, t = run_requests(engine, prompts, output_len)
    decode_start = max(t.first_token.values())
    decode_end = max(t.finished.values())
    decode_tokens = streams * (output_len - 1)
    per_stream = [(t.finished[r] - t.first_token[r]) / (output_len - 1) for r in t.finished]
    return {
        "streams": streams,
        "wall_s": wall,
        "ttft_s_mean": statistics.mean(t.first_token.values()),
        "decode_tok_s": decode_tokens / max(decode_end - decode_start, 1e-9),
        "tpot_ms_p50": 1e3 * statistics.median(per_stream),
        "output_tok_s": streams * output_len / wall,
    }


def prefill(engine: LLMEngine, prompt_len: int, seed: int) -> dict:
    vocab = engine.config.model_config.vocab_size
    prompt = random_prompt(prompt_len, vocab, seed)
    wall, _ = run_requests(engine, [prompt], 1)
    return {"prompt_tokens": prompt_len, "ttft_s": wall, "prefill_tok_s": prompt_len / wall}


def follow_up(engine: LLMEngine, context_len: int, new_len: int, seed: int) -> dict:
    """A follow-up turn: `new_len` tokens after a `context_len`-token context already in
    the prefix cache (prefilled first, not timed); tok/s of the new tokens' prefill."""
    vocab = engine.config.model_config.vocab_size
    context = random_prompt(context_len, vocab, seed)
    run_requests(engine, [context], 1)
    before = engine.stats.cached_prompt_tokens
    wall, _ = run_requests(engine, [context + random_prompt(new_len, vocab, seed + 1)], 1)
    cached = engine.stats.cached_prompt_tokens - before
    computed = context_len + new_len - cached
    return {"ttft_s": wall, "computed_tokens": computed, "new_tok_s": computed / wall}


def shared_prefix(
    engine: LLMEngine, requests: int, prefix_len: int, suffix_len: int, output_len: int, seed: int
) -> dict:
    vocab = engine.config.model_config.vocab_size
    prefix = random_prompt(prefix_len, vocab, seed)
    prompts = [prefix + random_prompt(suffix_len, vocab, seed + 1 + i) for i in range(requests)]
    before = engine.stats.cached_prompt_tokens
    wall, _ = run_requests(engine, prompts, output_len)
    cached = engine.stats.cached_prompt_tokens - before
    return {"wall_s": wall, "cached_share": cached / sum(len(p) for p in prompts)}


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)
