"""The prefill attention kernel (AVX-512 BF16 or AVX2: a chunk of queries over its paged
context) matches an fp32 reference, and `paged_attention` uses it for bf16 prefill chunks."""

import pytest
import torch

from agentcpu.layers import attention
from agentcpu.layers.attention import AttentionMetadata, PrefillChunk, paged_attention
from agentcpu.layers.fused_ops import prefill_attention_kernel

needs_kernel = pytest.mark.skipif(
    prefill_attention_kernel() is None, reason="CPU without AVX2 (or AVX-512 BF16)"
)


@pytest.fixture(params=["vector", "amx"])
def kernel_path(request):
    """Each test runs on the vector kernel and, where the CPU has AMX, on tiles."""
    uses_amx = getattr(prefill_attention_kernel(), "prefill_attention_uses_amx", None)
    previous = uses_amx(-1) if uses_amx is not None else -1
    if previous < 0:
        if request.param == "amx":
            pytest.skip("this CPU has no AMX tiles")
        yield request.param
        return
    uses_amx(int(request.param == "amx"))
    try:
        yield request.param
    finally:
        uses_amx(previous)


def _reference(q, k_cache, v_cache, slots, scale):
    """fp32 causal attention: query i sits at position C - L + i of the C-slot context."""
    length, heads, _ = q.shape
    context, kv_heads = slots.numel(), k_cache.shape[1]
    keys = k_cache[slots].float().transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
    values = v_cache[slots].float().transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
    scores = q.float().transpose(0, 1) @ keys.transpose(1, 2) * scale
    positions = torch.arange(context - length, context)[:, None]
    scores = scores.masked_fill(torch.arange(context)[None, :] > positions, float("-inf"))
    return (torch.softmax(scores, -1) @ values).transpose(0, 1)


def _case(length, context, heads, kv_heads, dim, seed):
    gen = torch.Generator().manual_seed(seed)
    slots_total = context + 40
    k_cache = torch.randn(slots_total, kv_heads, dim, generator=gen).bfloat16()
    v_cache = torch.randn(slots_total, kv_heads, dim, generator=gen).bfloat16()
    slots = torch.randperm(slots_total, generator=gen)[:context]  # scattered, like blocks
    q = torch.randn(length, heads, dim, generator=gen).bfloat16()
    return q, k_cache, v_cache, slots


@needs_kernel
@pytest.mark.parametrize(
    "length, context, heads, kv_heads, dim",
    [
        (1, 1, 2, 1, 64),  # one token, no context
        (5, 5, 14, 2, 64),  # a short prompt: the context is the chunk
        (7, 100, 14, 2, 64),  # a follow-up: 7 rows of 6-row tiles, mixed positions
        (64, 64, 8, 8, 128),  # head_dim 128: two 64-channel groups
        (33, 200, 32, 8, 64),  # Llama-3.2-1B heads
        (300, 1000, 14, 2, 64),  # many key blocks, the last one partly masked
        (17, 130, 4, 1, 128),
        (40, 40, 2, 2, 64),  # 16-row tiles of one query head: rows past a partial tile
        (11, 45, 4, 2, 64),  # a last key group of 13 (both gather halves partly masked), odd C
    ],
)
def test_matches_fp32_reference(length, context, heads, kv_heads, dim, kernel_path):
    q, k_cache, v_cache, slots = _case(length, context, heads, kv_heads, dim, length + context)
    scale = dim**-0.5
    out = prefill_attention_kernel().prefill_attention(q, k_cache, v_cache, slots, scale)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    ref = _reference(q, k_cache, v_cache, slots, scale)
    # probabilities rounded to bf16 before the value product, as flash attention does
    assert (out.float() - ref).abs().max().item() < 0.03


@needs_kernel
def test_reads_queries_through_their_strides(kernel_path):
    """q is a view of the fused qkv projection in the model: rows are strided."""
    q, k_cache, v_cache, slots = _case(9, 40, 4, 2, 64, 1)
    wide = torch.zeros(9, 8, 64).bfloat16()
    wide[:, :4] = q
    view = wide[:, :4]
    out = prefill_attention_kernel().prefill_attention(view, k_cache, v_cache, slots, 0.125)
    assert torch.equal(
        out, prefill_attention_kernel().prefill_attention(q, k_cache, v_cache, slots, 0.125)
    )


@needs_kernel
def test_rejects_what_it_cannot_run():
    q, k_cache, v_cache, slots = _case(4, 8, 2, 1, 64, 2)
    kernel = prefill_attention_kernel()
    with pytest.raises(RuntimeError, match="head_dim"):
        kernel.prefill_attention(
            q[..., :32].contiguous(),
            k_cache[..., :32].contiguous(),
            v_cache[..., :32].contiguous(),
            slots,
            1.0,
        )
    with pytest.raises(RuntimeError, match="bf16"):
        kernel.prefill_attention(q.float(), k_cache, v_cache, slots, 1.0)
    with pytest.raises(RuntimeError, match="must hold the chunk"):
        kernel.prefill_attention(q, k_cache, v_cache, slots[:3], 1.0)


@needs_kernel
@pytest.mark.parametrize("cached", [0, 37])
def test_paged_attention_uses_it_for_bf16_chunks(monkeypatch, cached):
    """Same output as the SDPA path, for a fresh prompt and for a chunk after cached
    context, and the kernel is the one called."""
    length, heads, kv_heads, dim = 12, 4, 2, 64
    q, k_cache, v_cache, _ = _case(length, cached + length, heads, kv_heads, dim, 3)
    k = torch.randn(length, kv_heads, dim).bfloat16()
    v = torch.randn(length, kv_heads, dim).bfloat16()
    new_slots = torch.arange(cached, cached + length)
    context = torch.arange(cached + length) if cached else None
    chunk = PrefillChunk(0, length, cached + length, context)
    meta = AttentionMetadata(slot_mapping=new_slots, prefills=[chunk])
    calls = []
    real = prefill_attention_kernel()

    class Spy:
        def prefill_attention(self, *args):
            calls.append(args[3].numel())
            return real.prefill_attention(*args)

    monkeypatch.setattr(attention, "prefill_attention_kernel", lambda: Spy())
    ours = paged_attention(q, k, v, k_cache.clone(), v_cache.clone(), meta, dim**-0.5)
    monkeypatch.setattr(attention, "prefill_attention_kernel", lambda: None)
    chunk.mask = None
    sdpa = paged_attention(q, k, v, k_cache.clone(), v_cache.clone(), meta, dim**-0.5)
    assert calls == [cached + length]
    assert (ours.float() - sdpa.float()).abs().max().item() < 0.03
