"""The native decode stack (`models/decode_stack.py`) computes what the modules do.

Every pure decode step of a real engine run is computed twice: by the stack, then by
the modules (the KV write is repeated with the same values), and the hidden states must
be equal bit for bit, for packed bf16, int8 and int4 weights, q/k biases (Qwen2), q/k
norms (Qwen3) and tied heads (Llama), at batch sizes 1 to 5."""

from __future__ import annotations

import pytest
import torch

from agentcpu.models import decode_stack
from tests.engine.helpers import greedy, make_engine, random_prompts, run_all


def _stack_or_skip():
    if decode_stack.stack_kernel() is None:
        pytest.skip("no compiler / AVX2 here: the modules run every step")


def _check_every_decode_step(engine) -> list[int]:
    """Wrap the model's forward so each stacked step is recomputed by the modules and
    compared; returns the batch sizes compared."""
    model, compared = engine.model, []
    forward = model.forward

    def both(input_ids, positions, kv_caches, meta):
        out = forward(input_ids, positions, kv_caches, meta)
        stack = model._stack
        pure_decode = meta.num_decode == input_ids.shape[0] and not meta.prefills
        if stack is not None and pure_decode and meta.num_decode <= stack.max_rows:
            model._stack = None
            try:
                ref = forward(input_ids, positions, kv_caches, meta)
            finally:
                model._stack = stack
            assert torch.equal(out, ref), f"batch {meta.num_decode}: stack and modules differ"
            compared.append(meta.num_decode)
        return out

    model.forward = both
    return compared


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama"])
@pytest.mark.parametrize("quant", [None, "int8", "int4-g32"])
def test_stack_matches_the_modules(checkpoint_dir, family, quant):
    _stack_or_skip()
    engine = make_engine(checkpoint_dir(family), dtype="bfloat16", quant=quant, kv_cache_gb=0.05)
    compared = _check_every_decode_step(engine)
    prompts = random_prompts(5, [3, 17, 40, 9, 33], seed=1)
    outputs = run_all(engine, prompts, [greedy(n) for n in (6, 14, 4, 9, 12)])
    assert [len(o) for o in outputs] == [6, 14, 4, 9, 12]
    assert engine.model._stack is not None, "a bf16 model with compiled kernels gets a stack"
    assert max(compared) == 5 and 1 in compared, compared


def test_same_tokens_with_and_without_the_stack(checkpoint_dir, monkeypatch):
    _stack_or_skip()
    path = checkpoint_dir("qwen2")
    prompts = random_prompts(4, [5, 30, 12, 21], seed=2)
    runs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv(decode_stack.DISABLE_ENV, flag)
        engine = make_engine(path, dtype="bfloat16", quant="int4-g32", kv_cache_gb=0.05)
        runs[flag] = run_all(engine, prompts, greedy(10))
        assert (engine.model._stack is not None) == (flag == "1")
    assert runs["1"] == runs["0"]


def test_no_stack_where_a_layer_has_no_compiled_op(checkpoint_dir):
    """fp32 weights run PyTorch's GEMM: no stack, and the modules still decode."""
    _stack_or_skip()
    engine = make_engine(checkpoint_dir("llama"), dtype="float32", kv_cache_gb=0.05)
    assert len(run_all(engine, random_prompts(2, [4, 9]), greedy(5))[1]) == 5
    assert engine.model._stack_caches is not None and engine.model._stack is None


def test_reset_rebuilds_over_new_weights(checkpoint_dir):
    """The stack holds the weights it was built with; after replacing one and calling
    `reset_decode_stack` the next decode step runs over the new one."""
    _stack_or_skip()
    engine = make_engine(checkpoint_dir("llama"), dtype="bfloat16", quant="int8", kv_cache_gb=0.05)
    compared = _check_every_decode_step(engine)
    prompts = random_prompts(2, [6, 11], seed=3)
    before = run_all(engine, prompts, greedy(8))
    down = engine.model.model.layers[0].mlp.down_proj
    down.register_buffer("scales", down.scales * 4)
    engine.model.reset_decode_stack()
    after = run_all(engine, prompts, greedy(8))
    assert before != after and len(compared) > 8


def test_stack_runs_without_the_gil_behind_the_async_front_door(checkpoint_dir):
    """The engine thread runs each stacked step with the GIL released, and the ops inside
    that release it themselves must see that (pybind11 aborts the process otherwise);
    concurrent streams through the event loop get the offline tokens."""
    _stack_or_skip()
    import asyncio

    from agentcpu.engine.async_engine import AsyncEngine

    engine = make_engine(
        checkpoint_dir("qwen2"), dtype="bfloat16", quant="int4-g32", kv_cache_gb=0.05
    )
    prompts = random_prompts(4, [7, 25, 13], seed=4)
    expected = run_all(engine, prompts, greedy(10))
    front = AsyncEngine(engine)

    async def collect(prompt, i):
        return [o async for o in front.generate(prompt, greedy(10), f"g{i}")]

    async def main():
        return await asyncio.gather(*(collect(p, i) for i, p in enumerate(prompts)))

    try:
        results = asyncio.run(main())
    finally:
        front.shutdown()
    assert engine.model._stack is not None
    assert [r[-1].token_ids for r in results] == expected


def test_batches_above_the_stack_rows_run_the_modules(checkpoint_dir, monkeypatch):
    """A stack serves 1..max_rows sequences (the rows every op's kernel choice holds for);
    a bigger decode batch takes the modules, with the same tokens."""
    _stack_or_skip()
    from agentcpu.layers import linear

    monkeypatch.setattr(linear, "DECODE_STACK_ROWS", 2)
    path = checkpoint_dir("llama")
    engine = make_engine(path, dtype="bfloat16", quant="int8", kv_cache_gb=0.05)
    compared = _check_every_decode_step(engine)
    prompts = random_prompts(4, [5, 19, 8, 30], seed=6)
    outputs = run_all(engine, prompts, [greedy(n) for n in (3, 9, 5, 7)])
    assert engine.model._stack.max_rows == 2
    assert compared and max(compared) == 2
    monkeypatch.setenv(decode_stack.DISABLE_ENV, "0")
    reference = make_engine(path, dtype="bfloat16", quant="int8", kv_cache_gb=0.05)
    assert run_all(reference, prompts, [greedy(n) for n in (3, 9, 5, 7)]) == outputs
