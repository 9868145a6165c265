"""Engine construction and run-to-completion helpers for engine tests."""

from __future__ import annotations

import torch

from agentcpu.engine.llm_engine import LLMEngine
from agentcpu.engine.sampling_params import SamplingParams
from agentcpu.models.loading import resolve_engine_config


def make_engine(path, kv_cache_gb=0.01, block_size=16, **options) -> LLMEngine:
    cfg = resolve_engine_config(
        str(path),
        dtype=options.pop("dtype", "float32"),
        max_model_len=options.pop("max_model_len", 512),
        kv_cache_gb=kv_cache_gb,
        block_size=block_size,
        **options,
    )
    return LLMEngine(cfg)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def run_all(engine: LLMEngine, prompts: list[list[int]], params) -> list[list[int]]:
    """Submit all prompts at once, step to completion, outputs in prompt order."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    ids = [engine.add_request(p, sp).request_id for p, sp in zip(prompts, params, strict=True)]
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
    return [done[i] for i in ids]


def random_prompts(n: int, lengths, vocab: int = 512, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]
