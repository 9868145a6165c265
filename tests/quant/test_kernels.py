"""Each kernel against the float reference F.linear(x, dequantized weight).

Tolerance: the GEMV kernels quantize activations to int8 per 32-block (scale d =
max|x| / 127 over the block), so each x is off by at most d / 2 and an output by at most
sum_k |w_k| d_block(k) / 2 (`_activation_bound`); the tiled kernels and the fallback only
round in fp32. bf16 outputs add bf16 rounding (2^-8 relative).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from agentcpu.quant import formats, ops
from agentcpu.quant.kernels import kernels

FP32_SLACK = 1e-5  # of sum |w||x|: fp32 accumulation over a few hundred terms
BF16_REL = 2.0**-8


def _activation_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    blocks = x.float().reshape(*x.shape[:-1], -1, formats.BLOCK)
    half_step = blocks.abs().amax(-1, keepdim=True) / 127 / 2
    return half_step.expand_as(blocks).reshape(x.shape) @ w.abs().T


def _assert_close(out, x, w_deq, bias, quantized_acts: bool):
    ref = F.linear(x.float(), w_deq, None if bias is None else bias.float())
    tol = FP32_SLACK * (x.float().abs() @ w_deq.abs().T) + 1e-6
    if quantized_acts:
        tol = tol + _activation_bound(x, w_deq)
    if out.dtype == torch.bfloat16:
        tol = tol + BF16_REL * ref.abs()
    assert out.shape == ref.shape and out.dtype == x.dtype
    excess = ((out.float() - ref).abs() - tol).max().item()
    assert excess <= 0, f"error exceeds the bound by {excess}"


def _data(batch, k=256, n=72, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    x = (torch.randn(batch, k, generator=g) * torch.linspace(0.1, 3, k)).to(dtype)
    b = (torch.randn(n, generator=g) * 0.1).to(dtype) if bias else None
    return w, x, b


needs_kernels = pytest.mark.skipif(kernels() is None, reason="no compiled kernels here")
BATCHES = [1, 3, 8, 17]
DTYPES = [torch.float32, torch.bfloat16]


@needs_kernels
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [None, 32])
def test_int8_gemv(batch, dtype, group):
    w, x, b = _data(batch, dtype=dtype)
    q = formats.quantize_int8(w, group)
    out = kernels().int8_linear_gemv(x, q.qweight, q.scales, b)
    _assert_close(out, x, formats.dequantize_int8(q), b, quantized_acts=True)


@needs_kernels
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", formats.INT4_GROUP_SIZES)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("k", [256, 640])
def test_int4_gemv(batch, dtype, group, symmetric, k):
    """640 in_features: 10 chunks (two 4-chunk steps and a tail at group 32) and 20 / 10 / 5
    groups, so the 8-wide offset steps end in a partial one."""
    w, x, b = _data(batch, k=k, dtype=dtype)
    q = formats.quantize_int4(w, group, symmetric)
    out = kernels().int4_linear_gemv(x, q.qweight, q.scales, q.offsets, b)
    _assert_close(out, x, formats.dequantize_int4(q), b, quantized_acts=True)


@needs_kernels
@pytest.mark.parametrize("n", [1, 3])
def test_int4_gemv_reads_no_scale_past_the_last_row(n):
    """896 in_features at group 128: 7 groups a row. Rows whose 8-wide scale / offset read
    would run past the tensor's end take the lane-by-lane path; the others are masked."""
    w, x, b = _data(2, k=896, n=n)
    q = formats.quantize_int4(w, 128, False)
    out = kernels().int4_linear_gemv(x, q.qweight, q.scales.clone(), q.offsets.clone(), b)
    _assert_close(out, x, formats.dequantize_int4(q), b, quantized_acts=True)


@needs_kernels
@pytest.mark.parametrize("batch", [1, 17, 40])
@pytest.mark.parametrize("bf16_tiles", [False, True])
def test_tiled_kernels(batch, bf16_tiles):
    w, x, b = _data(batch, k=288, n=300)  # 300 rows: a partial last tile
    q8, q4 = formats.quantize_int8(w), formats.quantize_int4(w, 32)
    out8 = kernels().int8_linear_tiled(x, q8.qweight, q8.scales, b, bf16_tiles)
    out4 = kernels().int4_linear_tiled(x, q4.qweight, q4.scales, q4.offsets, b, bf16_tiles)
    for out, q in ((out8, formats.dequantize_int8(q8)), (out4, formats.dequantize_int4(q4))):
        if bf16_tiles:  # x and weights rounded to bf16, and the matmul's output too
            xr, qr = x.bfloat16().float(), q.bfloat16().float()
            ref = F.linear(xr, qr, b)
            tol = 2 * BF16_REL * ref.abs() + 1e-3 * (xr.abs() @ qr.abs().T)
            assert ((out - ref).abs() <= tol).all()
        else:
            _assert_close(out, x, q, b, quantized_acts=False)


@needs_kernels
def test_gemv_rejects_mismatched_input():
    w, x, _ = _data(2)
    q = formats.quantize_int8(w)
    with pytest.raises(RuntimeError, match="features"):
        kernels().int8_linear_gemv(x[:, :128], q.qweight, q.scales, None)


@pytest.mark.parametrize("batch", [1, 20])
def test_dispatch_and_fallback_agree(batch):
    """ops.* (whatever path this machine picks) and the PyTorch fallback, on 3-D input."""
    w, x, b = _data(batch)
    x3 = x.reshape(1, batch, -1)
    q8, q4 = formats.quantize_int8(w), formats.quantize_int4(w, 64)
    for out, fallback, deq in (
        (
            ops.int8_linear(x3, q8.qweight, q8.scales, b),
            ops.int8_linear_reference(x3, q8.qweight, q8.scales, b),
            formats.dequantize_int8(q8),
        ),
        (
            ops.int4_linear(x3, q4.qweight, q4.scales, q4.offsets, b),
            ops.int4_linear_reference(x3, q4.qweight, q4.scales, q4.offsets, b),
            formats.dequantize_int4(q4),
        ),
    ):
        assert out.shape == (1, batch, 72)
        _assert_close(fallback.reshape(batch, -1), x, deq, b, quantized_acts=False)
        _assert_close(out.reshape(batch, -1), x, deq, b, quantized_acts=True)


@needs_kernels
@pytest.mark.parametrize("bf16", [False, True])
def test_tiled_kernel_runs_under_inference_mode(bf16):
    """The engine runs under torch.inference_mode; the tiled kernel's worker threads
    write into the caller's inference tensors (regression: refused on AMX CPUs, where
    every prefill chunk takes this kernel). Four weight tiles, so workers do run."""
    w, x, b = _data(32, n=1024, dtype=torch.bfloat16)
    q = formats.quantize_int8(w)
    with torch.inference_mode():
        out = kernels().int8_linear_tiled(x, q.qweight, q.scales, b, bf16)
    ref = F.linear(x.float(), formats.dequantize_int8(q), b.float())
    assert torch.allclose(out.float(), ref, rtol=0.02, atol=0.02 * ref.abs().max().item())


def test_odd_in_features_use_a_correct_path():
    """in_features not a multiple of the GEMV block (int8 per channel allows any)."""
    w, x, b = _data(2, k=100)
    q = formats.quantize_int8(w)
    _assert_close(
        ops.int8_linear(x, q.qweight, q.scales, b),
        x,
        formats.dequantize_int8(q),
        b,
        quantized_acts=False,
    )


def test_int4_in_features_off_the_gemv_step_use_a_correct_path():
    """192 in_features: a multiple of 64, not of the AVX-512 GEMV's 128-weight step."""
    w, x, b = _data(2, k=192)
    q = formats.quantize_int4(w, 64)
    out = ops.int4_linear(x, q.qweight, q.scales, q.offsets, b)
    _assert_close(out, x, formats.dequantize_int4(q), b, quantized_acts=True)


def test_modules_work_without_compiled_kernels(monkeypatch):
    """Where no kernel can be built (Arm, no compiler) the modules use the fallback."""
    from agentcpu.quant import Int4Linear, Int8Linear

    monkeypatch.setattr(ops, "kernels", lambda: None)
    w, x, b = _data(3)
    for module in (Int8Linear.from_float(w, b), Int4Linear.from_float(w, b, group_size=32)):
        _assert_close(module(x), x, module.dequantized_weight(), b, quantized_acts=False)


@needs_kernels
def test_gemv_reads_strided_and_half_inputs():
    """Non-contiguous activations are copied; fp16 (not a model dtype) runs via fp32."""
    w, x, b = _data(6)
    q = formats.quantize_int8(w)
    strided = torch.cat([x, x], dim=1)[:, ::2]
    assert not strided.is_contiguous()
    for inp in (strided, x.half()):
        out = kernels().int8_linear_gemv(inp, q.qweight, q.scales, b)
        ref_x = inp.float()
        assert out.dtype == inp.dtype
        tol = _activation_bound(ref_x, formats.dequantize_int8(q)) + 2e-3
        ref = F.linear(ref_x, formats.dequantize_int8(q), b)
        assert ((out.float() - ref).abs() <= tol).all()


@needs_kernels
def test_gemv_bias_in_any_dtype_and_layout():
    """The GEMV reads an fp32 or bf16 bias as it is and converts any other (fp16, strided);
    every form adds the same values. A bias of the wrong length is refused."""
    w, x, b = _data(3, bias=True)
    b = b.bfloat16()
    q = formats.quantize_int4(w, 32, False)
    k = kernels()
    ref = k.int4_linear_gemv(x, q.qweight, q.scales, q.offsets, b.float())
    strided = torch.stack([b, b], dim=1)[:, 0]
    assert not strided.is_contiguous()
    for bias in (b, b.half(), strided):
        out = k.int4_linear_gemv(x, q.qweight, q.scales, q.offsets, bias)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    with pytest.raises(RuntimeError, match="bias has 71 values"):
        k.int4_linear_gemv(x, q.qweight, q.scales, q.offsets, b[:71])


needs_packed = pytest.mark.skipif(
    not ops.packed_path(), reason="no packed batch path here (AVX-512 BF16 or AVX2)"
)


def _assert_close_bf16_weights(out, x, w_deq, bias):
    """The packed path multiplies bf16-rounded dequantized weights (2^-9 relative each)
    with the bf16 activations in fp32, then rounds the output to bf16."""
    ref = F.linear(x.float(), w_deq, None if bias is None else bias.float())
    tol = 2.0**-8 * (x.float().abs() @ w_deq.abs().T) + BF16_REL * ref.abs() + 1e-6
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    excess = ((out.float() - ref).abs() - tol).max().item()
    assert excess <= 0, f"error exceeds the bound by {excess}"


@needs_packed
@pytest.mark.parametrize("batch", [1, 8, 17, 130])
@pytest.mark.parametrize("group", [None, 32])
def test_int8_packed(batch, group):
    """80 rows: one 64-row tile and a 16-row remainder; 130 tokens: two panels."""
    w, x, b = _data(batch, n=80, dtype=torch.bfloat16)
    q = formats.quantize_int8(w, group)
    out = kernels().int8_linear_packed(x, q.qweight, q.scales, b)
    _assert_close_bf16_weights(out, x, formats.dequantize_int8(q), b)


@needs_packed
@pytest.mark.parametrize("batch", [8, 17])
@pytest.mark.parametrize("group", formats.INT4_GROUP_SIZES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_packed(batch, group, symmetric):
    w, x, b = _data(batch, n=80, dtype=torch.bfloat16)
    q = formats.quantize_int4(w, group, symmetric)
    out = kernels().int4_linear_packed(x, q.qweight, q.scales, q.offsets, b)
    _assert_close_bf16_weights(out, x, formats.dequantize_int4(q), b)


@needs_packed
def test_bf16_batches_take_the_packed_path(monkeypatch):
    calls = []
    real = kernels()

    class Spy:
        def __getattr__(self, name):
            fn = getattr(real, name)
            return lambda *args: calls.append((name, args[0].shape[0])) or fn(*args)

    monkeypatch.setattr(ops, "kernels", lambda: Spy())
    w, _, b = _data(1, n=80)
    q = formats.quantize_int8(w)
    for batch, dtype in [
        (ops.packed_min_tokens() - 1, torch.bfloat16),
        (ops.packed_min_tokens(), torch.bfloat16),
        (32, torch.float32),
    ]:
        x = torch.randn(batch, 256).to(dtype)
        ops.int8_linear(x, q.qweight, q.scales, b.to(dtype))
    # fp32 batches: dequantize + matmul where bf16 matmul is native (AMX / AVX-512 BF16),
    # the GEMV elsewhere
    fp32_kernel = "int8_linear_tiled" if ops.native_bf16_matmul() else "int8_linear_gemv"
    assert [name for name, _ in calls] == ["int8_linear_gemv", "int8_linear_packed", fp32_kernel]
