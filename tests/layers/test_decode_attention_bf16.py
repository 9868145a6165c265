"""The AVX-512 BF16 decode attention matches an fp32 reference over padded, scattered
slots, and `paged_attention` uses it for bf16 decode rows where it applies."""

import pytest
import torch

from agentcpu.layers import attention
from agentcpu.layers.attention import AttentionMetadata, paged_attention
from agentcpu.layers.fused_ops import decode_attention_kernel, fused
from tests.layers.test_fused_ops import _reference_decode

needs_kernel = pytest.mark.skipif(
    decode_attention_kernel() is None, reason="CPU without AVX-512 BF16"
)


def _case(heads, kv_heads, dim, lens, seed=0):
    gen = torch.Generator().manual_seed(seed)
    num_slots = max(lens) * len(lens) + 16
    k_cache = torch.randn(num_slots, kv_heads, dim, generator=gen).bfloat16()
    v_cache = torch.randn(num_slots, kv_heads, dim, generator=gen).bfloat16()
    slots = torch.zeros(len(lens), max(lens), dtype=torch.long)
    for b, n in enumerate(lens):
        slots[b, :n] = torch.randperm(num_slots, generator=gen)[:n]
    q = torch.randn(len(lens), heads, dim, generator=gen).bfloat16()
    return q, k_cache, v_cache, slots, torch.tensor(lens)


@needs_kernel
@pytest.mark.parametrize(
    "heads, kv_heads, dim",
    [(4, 4, 64), (14, 2, 64), (32, 8, 64), (16, 8, 128), (8, 1, 64), (6, 2, 96), (40, 40, 128)],
)
def test_matches_fp32_reference(heads, kv_heads, dim):
    """1-8 query heads per KV head (14/2 is Qwen2.5-0.5B, 32/8 Llama-3.2-1B, 40/40 a
    multi-head model with 10 KB of KV a token), head_dim 64 / 96 / 128; lengths 1 (a single key), 17 (a 16-key group and one more, odd: the
    value pass's last pair is half empty) and 120."""
    q, k_cache, v_cache, slots, lens = _case(heads, kv_heads, dim, [1, 17, 120])
    got = decode_attention_kernel().decode_attention_bf16(
        q, k_cache, v_cache, slots, lens, dim**-0.5
    )
    ref = _reference_decode(q, k_cache, v_cache, slots, lens, dim**-0.5)
    assert got.dtype == torch.bfloat16 and got.shape == q.shape
    # probabilities rounded to bf16 before the value product, as flash attention does
    assert (got.float() - ref).abs().max().item() < 0.02


@needs_kernel
@pytest.mark.parametrize("heads, kv_heads, dim", [(14, 2, 64), (32, 8, 64), (16, 8, 128)])
@pytest.mark.parametrize("threads", [1, 2])
def test_long_contexts_split_into_chunks_match(heads, kv_heads, dim, threads):
    """Contexts longer than a chunk (at most 512 keys for 2 KV heads of 64, 64 for 8 of
    128) are split, each chunk softmaxed against its own max and merged; the lengths give
    one-chunk and several-chunk sequences with partial last chunks, in one batch."""
    q, k_cache, v_cache, slots, lens = _case(heads, kv_heads, dim, [700, 3, 1300, 64], seed=2)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = decode_attention_kernel().decode_attention_bf16(
            q, k_cache, v_cache, slots, lens, dim**-0.5
        )
    finally:
        torch.set_num_threads(before)
    ref = _reference_decode(q, k_cache, v_cache, slots, lens, dim**-0.5)
    assert (got.float() - ref).abs().max().item() < 0.02


@needs_kernel
def test_one_dominant_key_in_a_late_chunk():
    """A key that takes almost all the weight, in a later chunk than the first: the merge
    rescales the earlier chunks' sums by their max against it (merging chunk-local
    softmaxes without that would average the chunks instead)."""
    heads, kv_heads, dim = 14, 2, 64
    q, k_cache, v_cache, slots, lens = _case(heads, kv_heads, dim, [1500], seed=3)
    q[0, :7] = q[0, 0]  # KV head 0's query heads all look for the hot key
    hot = slots[0, 1234].item()
    k_cache[hot, 0] = q[0, 0].float().mul(8).bfloat16()
    got = decode_attention_kernel().decode_attention_bf16(
        q, k_cache, v_cache, slots, lens, dim**-0.5
    )
    ref = _reference_decode(q, k_cache, v_cache, slots, lens, dim**-0.5)
    assert (got.float() - ref).abs().max().item() < 0.02
    assert (got[0, :7].float() - v_cache[hot, 0].float()).abs().max().item() < 0.02


@needs_kernel
def test_rejects_what_it_cannot_run():
    kernel = decode_attention_kernel()
    q, k_cache, v_cache, slots, lens = _case(4, 1, 64, [5])
    with pytest.raises(RuntimeError, match="at most 8"):
        q16 = torch.randn(1, 16, 64).bfloat16()
        kernel.decode_attention_bf16(q16, k_cache, v_cache, slots, lens, 1.0)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        cut = [t[..., :48].contiguous() for t in (q, k_cache, v_cache)]
        kernel.decode_attention_bf16(*cut, slots, lens, 1.0)
    with pytest.raises(RuntimeError, match="context length"):
        kernel.decode_attention_bf16(q, k_cache, v_cache, slots, torch.tensor([6]), 1.0)


@needs_kernel
def test_paged_attention_uses_it_and_agrees_with_the_avx2_kernel(monkeypatch):
    heads, kv_heads, dim = 14, 2, 64
    q, k_cache, v_cache, slots, lens = _case(heads, kv_heads, dim, [3, 40, 70], seed=1)
    new = torch.tensor([slots[b, n - 1].item() for b, n in enumerate(lens.tolist())])
    k, v = k_cache[new].clone(), v_cache[new].clone()
    meta = AttentionMetadata(slot_mapping=new, num_decode=3, decode_slots=slots, decode_lens=lens)
    calls = []
    real = decode_attention_kernel()

    class Spy:
        def decode_attention_bf16(self, *args):
            calls.append(args[0].shape[0])
            return real.decode_attention_bf16(*args)

    monkeypatch.setattr(attention, "decode_attention_kernel", lambda: Spy())
    ours = paged_attention(q, k, v, k_cache.clone(), v_cache.clone(), meta, dim**-0.5)
    assert calls == [3]
    if fused() is not None:
        monkeypatch.setattr(attention, "decode_attention_kernel", lambda: None)
        avx2 = paged_attention(q, k, v, k_cache.clone(), v_cache.clone(), meta, dim**-0.5)
        assert (ours.float() - avx2.float()).abs().max().item() < 0.02
