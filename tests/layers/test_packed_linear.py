"""Packed bf16 linear layers: the layout, the kernel against an fp32 reference, the module
swap at load and what still works on a packed model (quantizing it)."""

import pytest
import torch
import torch.nn.functional as F

from agentcpu.layers.bf16_kernel import bf16_packed_kernel
from agentcpu.layers.linear import Linear
from agentcpu.layers.packed_linear import (
    PackedEmbedding,
    PackedLinear,
    pack_linears,
    pack_weight,
    packable,
    unpack_weight,
)
from agentcpu.models import loading
from agentcpu.quant import apply_quant
from agentcpu.quant.modules import Int8Linear
from tests.engine.helpers import make_engine

needs_packed = pytest.mark.skipif(
    bf16_packed_kernel() is None, reason="CPU without AVX-512 BF16 or AVX2"
)


def _reference(x, w, b):
    return F.linear(x.float(), w.float(), None if b is None else b.float())


def _assert_close(out, ref):
    # exact bf16 products, fp32 sums in another order, one bf16 rounding at the end
    assert torch.allclose(out.float(), ref, rtol=8e-3, atol=8e-3 * ref.abs().max().item())


def _linear(n, k, bias, seed=0):
    layer = Linear(k, n, bias, torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)
    layer.weight.data.copy_(torch.randn(n, k, generator=gen) * 0.1)
    if bias:
        layer.bias.data.copy_(torch.randn(n, generator=gen))
    return layer


def test_layout_is_vdpbf16ps_operand_order():
    w = torch.arange(32 * 6, dtype=torch.float32).view(32, 6).bfloat16()
    p = pack_weight(w)
    assert p.shape == (2, 3, 16, 2)
    # block 1, k pair 2: rows 16..31, k 4..5
    assert torch.equal(p[1, 2], w[16:32, 4:6])
    assert torch.equal(unpack_weight(p), w)


@needs_packed
@pytest.mark.parametrize("n, k", [(16, 2), (32, 14), (48, 30), (64, 896)])  # pairs 1, 7, 15, 448
def test_native_pack_matches_the_permute_in_place_or_not(n, k):
    w = (torch.randn(n, k) * 3).bfloat16()
    expected = w.view(n // 16, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()
    out = torch.empty_like(expected)
    bf16_packed_kernel().bf16_pack_weight(w, out)
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16))
    inplace = w.clone()
    bf16_packed_kernel().bf16_pack_weight(inplace, inplace)  # block by block, in its own bytes
    assert torch.equal(inplace.view(expected.shape).view(torch.int16), expected.view(torch.int16))
    shared = torch.zeros(n * k + 2, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="partly overlaps"):  # one pair apart: refused
        bf16_packed_kernel().bf16_pack_weight(shared[: n * k].view(n, k), shared[2:])


def test_packing_in_place_only_where_the_loader_asks_and_the_pages_are_huge():
    from agentcpu.hardware import huge_pages

    w = torch.randn(1024, 1536).bfloat16()  # 3 MiB
    plain = pack_weight(w.clone(), in_place=True)  # not in huge pages: a new buffer
    assert torch.equal(unpack_weight(plain), w)
    if not huge_pages.enabled() or bf16_packed_kernel() is None:
        return
    held = huge_pages.weight_buffer(tuple(w.shape), w.dtype).copy_(w)
    assert torch.equal(unpack_weight(pack_weight(held)), w) and torch.equal(held, w)  # copy
    packed = pack_weight(held, in_place=True)
    assert packed.data_ptr() == held.data_ptr()  # the same memory, now packed
    assert torch.equal(unpack_weight(packed), w)


def test_only_bf16_shapes_that_pack():
    assert packable(_linear(32, 64, False))
    assert not packable(_linear(24, 64, False))  # rows not a multiple of 16
    assert not packable(_linear(32, 63, False))  # odd in_features
    fp32 = Linear(64, 32, False, torch.float32)
    assert not packable(fp32)


@needs_packed
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 6, 7, 8, 13, 128, 129, 300])
@pytest.mark.parametrize("n, k", [(16, 2), (48, 64), (80, 100), (272, 896), (96, 4864)])
def test_kernel_matches_fp32_reference(rows, n, k):
    """Every remainder of the token groups (6 on AVX-512, 4 on AVX2, where one and two
    tokens take 4 and 2 blocks a tile; from 8 tokens 6 on AVX-512F without BF16) and of the 4-block tiles (1, 3, 5 and 17 blocks),
    128-token panels and one past it, K of one pair and K long."""
    gen = torch.Generator().manual_seed(rows * 1000 + n * 10 + k)
    x = torch.randn(rows, k, generator=gen).bfloat16()
    w = (torch.randn(n, k, generator=gen) * 0.1).bfloat16()
    b = torch.randn(n, generator=gen).bfloat16()
    for bias in (b, None):
        out = bf16_packed_kernel().bf16_packed_linear(x, pack_weight(w), bias)
        assert out.dtype == torch.bfloat16 and out.shape == (rows, n)
        _assert_close(out, _reference(x, w, bias))


@needs_packed
def test_kernel_rounds_like_torch_and_keeps_nan():
    """Sums exactly halfway between two bf16 values round to even (1 + 2^-8 -> 1,
    1 + 2^-7 + 2^-8 -> 1 + 2^-6), as torch's fp32 -> bf16 does; a NaN input gives NaN
    outputs, not a finite value."""
    w = torch.ones(16, 2).bfloat16()
    x = torch.tensor([[1.0, 2**-8], [1 + 2**-7, 2**-8], [float("nan"), 1.0]]).bfloat16()
    for copies in (1, 4):  # 3 rows (decode-sized tiles) and 12 (batch tiles)
        out = bf16_packed_kernel().bf16_packed_linear(x.repeat(copies, 1), pack_weight(w), None)
        for i in range(0, 3 * copies, 3):
            assert torch.equal(out[i : i + 2], (x[:2].float() @ w.float().T).bfloat16())
            assert out[i, 0].item() == 1.0 and out[i + 1, 0].item() == 1 + 2**-6
            assert torch.isnan(out[i + 2]).all()


@needs_packed
def test_kernel_rejects_what_it_cannot_multiply():
    k = bf16_packed_kernel()
    p = pack_weight(torch.randn(16, 8).bfloat16())
    with pytest.raises(RuntimeError, match="features"):
        k.bf16_packed_linear(torch.randn(2, 6).bfloat16(), p, None)
    with pytest.raises(RuntimeError, match="input must be bf16"):
        k.bf16_packed_linear(torch.randn(2, 8), p, None)
    with pytest.raises(RuntimeError, match="bias"):
        k.bf16_packed_linear(torch.randn(2, 8).bfloat16(), p, torch.randn(15))
    with pytest.raises(RuntimeError, match="packed weight"):
        k.bf16_packed_linear(torch.randn(2, 8).bfloat16(), torch.randn(16, 8).bfloat16(), None)


@needs_packed
def test_module_keeps_the_layer_contract():
    layer = _linear(48, 64, True)
    packed = PackedLinear.from_linear(layer)
    assert (packed.in_features, packed.out_features) == (64, 48)
    assert torch.equal(packed.weight, layer.weight.data) and torch.equal(
        packed.bias, layer.bias.data
    )
    x = torch.randn(2, 3, 64).bfloat16()
    _assert_close(packed(x), _reference(x, layer.weight, layer.bias))
    x32 = torch.randn(5, 64)  # fp32 activations take PyTorch's path
    assert torch.allclose(packed(x32), _reference(x32, layer.weight, layer.bias), atol=1e-5)


@needs_packed
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_loaded_bf16_model_is_packed_and_agrees_with_the_plain_one(
    checkpoint_dir, monkeypatch, family
):
    """qwen2's tiny checkpoint has its own LM head, llama's is tied to the embedding."""
    path = checkpoint_dir(family)
    engine = make_engine(path, dtype="bfloat16")
    monkeypatch.setattr(loading, "pack_linears", lambda model: 0)
    plain = make_engine(path, dtype="bfloat16")
    layers = engine.config.model_config.num_layers
    packed_layers = [m for m in engine.model.modules() if isinstance(m, PackedLinear)]
    assert len(packed_layers) == 4 * layers + 1  # + the LM head, own or tied
    assert not any(isinstance(m, PackedLinear) for m in plain.model.modules())
    prompt = torch.randint(0, 512, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    ours, theirs = engine.prompt_logits(prompt), plain.prompt_logits(prompt)
    agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    assert agree >= 0.97, f"top-1 agreement packed vs plain {agree:.3f}"


@needs_packed
def test_a_tied_head_shares_the_embedding_table(checkpoint_dir, monkeypatch):
    path = checkpoint_dir("llama")
    engine = make_engine(path, dtype="bfloat16")
    monkeypatch.setattr(loading, "pack_linears", lambda model: 0)
    plain = make_engine(path, dtype="bfloat16")
    assert plain.model.lm_head is None  # the checkpoint is tied
    embedding, head = engine.model.model.embed_tokens, engine.model.lm_head
    assert isinstance(embedding, PackedEmbedding) and isinstance(head, PackedLinear)
    assert embedding.packed.data_ptr() == head.packed.data_ptr()  # one table, not two
    table = plain.model.model.embed_tokens.weight
    assert torch.equal(embedding.weight, table)
    ids = torch.tensor([[0, 17, 511], [255, 16, 15]])
    assert torch.equal(embedding(ids), table[ids])


@needs_packed
def test_a_packed_model_quantizes(checkpoint_dir):
    engine = make_engine(checkpoint_dir("llama"), dtype="bfloat16")
    assert any(isinstance(m, PackedLinear) for m in engine.model.modules())
    apply_quant(engine.model, "int8")
    assert not any(isinstance(m, PackedLinear) for m in engine.model.modules())
    assert sum(isinstance(m, Int8Linear) for m in engine.model.modules()) > 0


def test_nothing_is_swapped_without_the_kernel(monkeypatch):
    from agentcpu.layers import packed_linear

    monkeypatch.setattr(packed_linear, "bf16_packed_kernel", lambda: None)
    model = torch.nn.Sequential(_linear(32, 64, False))
    assert pack_linears(model) == 0 and isinstance(model[0], Linear)


@needs_packed
@pytest.mark.parametrize("rows", [1, 7, 15, 16, 17, 33, 64, 129])
def test_amx_tiles_and_vector_path_agree_with_the_reference(rows):
    """Where the CPU has AMX, products of `bf16_packed_amx_min_rows` rows or more run on
    tiles: 1, 2 and 3 blocks (pairs and a single), one or two 16-token tiles and a
    zero-padded partial one. Both paths are forced here at every row count."""
    kernel = bf16_packed_kernel()
    previous = kernel.bf16_packed_amx_min_rows(-1)
    if previous < 0:
        pytest.skip("this CPU has no AMX tiles")
    gen = torch.Generator().manual_seed(rows)
    try:
        for n, k in [(16, 32), (48, 64), (80, 896), (32, 4864)]:
            x = torch.randn(rows, k, generator=gen).bfloat16()
            w = (torch.randn(n, k, generator=gen) * 0.1).bfloat16()
            b = torch.randn(n, generator=gen).bfloat16()
            outs = []
            for threshold in (1, 1 << 40):  # tiles, then the VDPBF16PS tile
                kernel.bf16_packed_amx_min_rows(threshold)
                out = kernel.bf16_packed_linear(x, pack_weight(w), b)
                _assert_close(out, _reference(x, w, b))
                outs.append(out.float())
            assert torch.allclose(
                outs[0], outs[1], rtol=1e-2, atol=1e-2 * outs[1].abs().max().item()
            )
    finally:
        kernel.bf16_packed_amx_min_rows(previous)
