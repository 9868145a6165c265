"""The compiled fused ops equal the PyTorch code they replace: bit for bit in bf16 for
the element-wise ones (same rounding points), to fp32 tolerance otherwise."""

import pytest
import torch
import torch.nn.functional as F

from agentcpu.layers.fused_ops import fused
from agentcpu.layers.rope import RotaryEmbedding, _rotate

needs_fused = pytest.mark.skipif(fused() is None, reason="no compiled kernels on this CPU")
DTYPES = [torch.float32, torch.bfloat16]


def _exact_or_close(got, ref, dtype):
    if dtype == torch.bfloat16:
        assert torch.equal(got, ref)
    else:
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)


@needs_fused
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(dtype):
    x = (torch.randn(3, 5, 96) * 4).to(dtype)
    w = (torch.randn(96) * 0.3 + 1).to(dtype)
    x32 = x.float()
    ref = w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    got = fused().rms_norm(x, w, 1e-6)
    assert got.shape == x.shape
    # summation order may move one fp32 ulp, which can flip a rare bf16 rounding
    assert torch.allclose(got.float(), ref.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5)


@needs_fused
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_is_the_add_then_the_norm(dtype):
    """The fused residual add rounds the sum to the dtype, as `residual + x` does, and the
    norm of that sum is the unfused kernel's, bit for bit (same code after the sum)."""
    residual, x = (torch.randn(2, 7, 96) * 4).to(dtype), (torch.randn(2, 7, 96) * 3).to(dtype)
    w = (torch.randn(96) * 0.3 + 1).to(dtype)
    total, normed = fused().add_rms_norm(residual, x, w, 1e-6)
    assert total.shape == normed.shape == x.shape and total.dtype == normed.dtype == dtype
    assert torch.equal(total, residual + x)
    assert torch.equal(normed, fused().rms_norm(residual + x, w, 1e-6))
    with pytest.raises(RuntimeError, match="same shape"):
        fused().add_rms_norm(residual[:1], x, w, 1e-6)


def test_rms_norm_add_forward_without_kernels_matches(monkeypatch):
    from agentcpu.layers import norm

    layer = norm.RMSNorm(32, 1e-6, torch.float32)
    layer.weight.data.normal_()
    residual, x = torch.randn(5, 32), torch.randn(5, 32)
    expected = layer(residual + x)
    monkeypatch.setattr(norm, "fused_for", lambda t: None)
    total, normed = layer.add_forward(residual, x)
    assert torch.equal(total, residual + x) and torch.allclose(normed, expected, rtol=1e-5)


@needs_fused
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dtype):
    gate_up = (torch.randn(7, 2 * 40) * 3).to(dtype)
    gate, up = gate_up.split(40, dim=-1)
    _exact_or_close(fused().silu_mul(gate_up), F.silu(gate) * up, dtype)


@needs_fused
@pytest.mark.parametrize("up", [1.0, -3.5, 2.0**-7, 1e30, float("nan"), float("inf")])
def test_bf16_silu_mul_is_bit_exact_for_every_gate_value(up):
    """The bf16 path looks silu up in a table over all 65,536 gate values and rounds the
    product in vector code: every gate value (NaN, inf, subnormals included) against
    PyTorch's own bf16 silu(gate) * up, bit for bit; 65,536 is a multiple of 8, so the
    row's last 3 values also take the scalar tail."""
    gate = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    gate = torch.cat([gate, gate[:3]])
    gate_up = torch.cat([gate, torch.full_like(gate, up)]).reshape(1, -1)
    out = fused().silu_mul(gate_up)
    ref = F.silu(gate) * torch.full_like(gate, up)
    same = (out.view(torch.int16) == ref.view(torch.int16)) | (out.isnan() & ref.isnan())
    assert same.all(), f"{(~same).sum().item()} gate values differ"


@needs_fused
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_in_place_on_views_of_a_fused_projection(dtype):
    heads, kv_heads, dim, tokens = 4, 2, 32, 9
    rope = RotaryEmbedding(dim, 10000.0, None, 256)
    rope.build(256, dtype)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim).to(dtype)
    q, k, _ = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q, k = q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim)
    positions = torch.randint(0, 256, (tokens,))
    cos = rope.cos_sin[0, positions].unsqueeze(1)
    sin = rope.cos_sin[1, positions].unsqueeze(1)
    ref_q, ref_k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    fused().rope_inplace(q, k, rope.cos_sin, positions)
    _exact_or_close(q, ref_q, dtype)
    _exact_or_close(k, ref_k, dtype)


def _reference_decode(q, k_cache, v_cache, slots, lens, scale):
    out = []
    for b in range(q.shape[0]):
        keys = k_cache[slots[b, : lens[b]]].float().transpose(0, 1)  # [KVH, L, D]
        values = v_cache[slots[b, : lens[b]]].float().transpose(0, 1)
        group = q.shape[1] // keys.shape[0]
        keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
        scores = torch.softmax((q[b].float()[:, None, :] @ keys.transpose(1, 2)) * scale, -1)
        out.append((scores @ values)[:, 0, :])
    return torch.stack(out)


@needs_fused
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, dim", [(4, 4, 64), (8, 2, 64), (6, 1, 64),
                                                   (14, 2, 64), (16, 8, 128), (8, 1, 64),
                                                   (32, 1, 64), (4, 2, 36)])
def test_decode_attention_over_padded_slots(dtype, heads, kv_heads, dim):
    """Groups of 1-8 query heads per KV head take the 8-lane path (14/2 is Qwen2.5-0.5B's);
    (32, 1): more query heads per key than it holds; dim 36: not a multiple of the vector
    width (both take the portable path). 120 slots cross the value pass's 64-key tiles."""
    num_slots = 200
    k_cache = torch.randn(num_slots, kv_heads, dim).to(dtype)
    v_cache = torch.randn(num_slots, kv_heads, dim).to(dtype)
    lens = torch.tensor([1, 37, 120])
    slots = torch.zeros(3, 120, dtype=torch.long)
    for b, n in enumerate(lens.tolist()):
        slots[b, :n] = torch.randperm(num_slots)[:n]
    q = torch.randn(3, heads, dim).to(dtype)
    got = fused().decode_attention(q, k_cache, v_cache, slots, lens, dim**-0.5)
    ref = _reference_decode(q, k_cache, v_cache, slots, lens, dim**-0.5)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(got.float(), ref, rtol=tol, atol=tol)


def _scattered_case(heads, kv_heads, dim, lens, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    num_slots = max(lens) * len(lens) + 16
    k_cache = torch.randn(num_slots, kv_heads, dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_slots, kv_heads, dim, generator=gen).to(dtype)
    slots = torch.zeros(len(lens), max(lens), dtype=torch.long)
    for b, n in enumerate(lens):
        slots[b, :n] = torch.randperm(num_slots, generator=gen)[:n]
    q = torch.randn(len(lens), heads, dim, generator=gen).to(dtype)
    return q, k_cache, v_cache, slots, torch.tensor(lens)


@needs_fused
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, dim", [(14, 2, 64), (32, 8, 64), (16, 8, 128)])
@pytest.mark.parametrize("threads", [1, 2])
def test_decode_attention_splits_long_contexts_into_chunks(dtype, heads, kv_heads, dim, threads):
    """Contexts longer than a chunk (128 KB of K: 512 keys for 2 bf16 KV heads of 64, 64
    for 8 fp32 ones of 128) are split, each chunk softmaxed against its own max and merged;
    one-chunk and several-chunk sequences with partial last chunks, in one batch."""
    q, k_cache, v_cache, slots, lens = _scattered_case(
        heads, kv_heads, dim, [700, 3, 1300, 64], dtype, seed=2
    )
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = fused().decode_attention(q, k_cache, v_cache, slots, lens, dim**-0.5)
    finally:
        torch.set_num_threads(before)
    ref = _reference_decode(q, k_cache, v_cache, slots, lens, dim**-0.5)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(got.float(), ref, rtol=tol, atol=tol)


@needs_fused
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention_one_dominant_key_in_a_late_chunk(dtype):
    """A key that takes almost all the weight, in a later chunk than the first: the merge
    rescales the earlier chunks' sums by their max against it (merging chunk-local
    softmaxes without that would average the chunks instead)."""
    q, k_cache, v_cache, slots, lens = _scattered_case(14, 2, 64, [1500], dtype, seed=3)
    q[0, :7] = q[0, 0]  # KV head 0's query heads all look for the hot key
    hot = slots[0, 1234].item()
    k_cache[hot, 0] = q[0, 0].float().mul(8).to(dtype)
    got = fused().decode_attention(q, k_cache, v_cache, slots, lens, 64**-0.5)
    ref = _reference_decode(q, k_cache, v_cache, slots, lens, 64**-0.5)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(got.float(), ref, rtol=tol, atol=tol)
    assert (got[0, :7].float() - v_cache[hot, 0].float()).abs().max().item() < 0.02


@needs_fused
def test_decode_attention_rejects_a_bad_length():
    cache = torch.zeros(8, 1, 16)
    with pytest.raises(RuntimeError, match="context length"):
        fused().decode_attention(torch.zeros(1, 1, 16), cache, cache, torch.zeros(1, 4, dtype=torch.long),
                                 torch.tensor([5]), 1.0)


@needs_fused
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_write_matches_index_copy(dtype):
    """k / v as the model makes them (views into one fused qkv row per token), written
    where index_copy_ writes them; a strided view takes index_copy_ inside the op."""
    ops = fused()
    g = torch.Generator().manual_seed(0)
    T, KVH, D, S = 5, 2, 64, 40
    qkv = torch.randn(T, 4 * KVH * D, generator=g).to(dtype)
    k = qkv[:, 2 * KVH * D : 3 * KVH * D].view(T, KVH, D)
    v = qkv[:, 3 * KVH * D :].view(T, KVH, D)
    slots = torch.tensor([7, 0, 39, 12, 13])
    want_k, want_v = torch.zeros(S, KVH, D, dtype=dtype), torch.zeros(S, KVH, D, dtype=dtype)
    want_k.index_copy_(0, slots, k)
    want_v.index_copy_(0, slots, v)
    for kk, vv in ((k, v), (k.transpose(0, 1).contiguous().transpose(0, 1), v)):
        got_k, got_v = torch.zeros_like(want_k), torch.zeros_like(want_v)
        ops.kv_write(got_k, got_v, slots, kk, vv)
        assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    with pytest.raises(RuntimeError, match="slot 40 is outside the cache's 40 slots"):
        ops.kv_write(got_k, got_v, torch.tensor([1, 2, 3, 4, 40]), k, v)


@needs_fused
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1, 13, 64, 1001])
def test_argmax_rows_matches_torch_max_with_ties(dtype, vocab):
    """First index of the maximum, as torch.max; ties planted in the vector body, the
    tail and across both; rows of -inf give 0."""
    x = torch.randn(6, vocab).to(dtype)
    x[1] = -float("inf")
    if vocab > 2:
        x[2, vocab - 1] = x[2, vocab // 2] = 50.0  # tie: the earlier index wins
        x[3, vocab - 1] = 60.0  # the maximum in the tail
        x[4, 0] = x[4, vocab - 2] = 70.0
    got = fused().argmax_rows(x)
    assert got.dtype == torch.int64
    assert got.tolist() == x.max(dim=-1).indices.tolist()


@needs_fused
def test_argmax_rows_flags_nan_rows():
    x = torch.randn(3, 100)
    x[1, 50] = float("nan")
    x[2, 97] = float("nan")  # in the tail
    assert fused().argmax_rows(x).tolist()[1:] == [-1, -1]


def test_paged_decode_without_kernels_masks_each_sequence_to_its_length(monkeypatch):
    """Where no compiled decode attention runs, SDPA attends over the padded slots with a
    mask built from decode_lens (once per step, shared by the layers)."""
    from agentcpu.layers import attention

    monkeypatch.setattr(attention, "decode_attention_op", lambda *args: None)
    k_cache, v_cache = torch.randn(200, 2, 64), torch.randn(200, 2, 64)
    lens = torch.tensor([1, 37, 120])
    slots = torch.zeros(3, 120, dtype=torch.long)
    for b, n in enumerate(lens.tolist()):
        slots[b, :n] = torch.randperm(200)[:n]
    q, k, v = torch.randn(3, 8, 64), torch.randn(3, 2, 64), torch.randn(3, 2, 64)
    new = torch.tensor([slots[b, n - 1].item() for b, n in enumerate(lens.tolist())])
    meta = attention.AttentionMetadata(
        slot_mapping=new, num_decode=3, decode_slots=slots, decode_lens=lens
    )
    got = attention.paged_attention(q, k, v, k_cache, v_cache, meta, 64**-0.5)
    ref = _reference_decode(q, k_cache, v_cache, slots, lens, 64**-0.5)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert meta.decode_mask is not None and meta.decode_mask.shape == (3, 1, 1, 120)
