"""int8 / int4 linear ops: pick the compiled kernel for this batch, or the PyTorch
fallback where no kernel is built (see `kernels.py`).

The GEMV kernel streams the quantized weights once per call and multiplies them with
activations quantized to int8 per 32-block; it serves every batch size on CPUs without
fast bf16 matmul (measured here on AVX2: it beats dequantize-then-fp32-GEMM up to batch
32 and beyond). Where bf16 matmul is fast (AMX / AVX-512 BF16), batches of
`TILED_MIN_TOKENS` rows or more dequantize tiles of weight rows to bf16 and multiply
with oneDNN instead. docs/quantization.md has the measurements.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from agentcpu.quant.formats import Int4Weight, Int8Weight, dequantize_int4, dequantize_int8
from agentcpu.quant.kernels import kernels, native_bf16_matmul

TILED_MIN_TOKENS = 16
GEMV_INT8_ALIGN = 32  # the int8 GEMV kernel works on whole 32-blocks of in_features
GEMV_INT4_ALIGN = 64  # the int4 GEMV kernel reads two 32-blocks per load


def _tokens(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def _use_tiled(x: torch.Tensor) -> bool:
    return native_bf16_matmul() and _tokens(x) >= TILED_MIN_TOKENS


def _bf16_tiles(x: torch.Tensor) -> bool:
    """Whether the tiled kernel multiplies in bf16: only for bf16 activations, so an fp32
    model's products stay fp32 on every CPU."""
    return native_bf16_matmul() and x.dtype == torch.bfloat16


def int8_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """y = x @ (qweight * scales).T + bias, formats as in `formats.Int8Weight`."""
    k = kernels()
    if k is None:
        return int8_linear_reference(x, qweight, scales, bias)
    group = qweight.shape[1] // scales.shape[1]
    if _use_tiled(x) or x.shape[-1] % GEMV_INT8_ALIGN or group % GEMV_INT8_ALIGN:
        return k.int8_linear_tiled(x, qweight, scales, bias, _bf16_tiles(x))
    return k.int8_linear_gemv(x, qweight, scales, bias)


def int4_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """y = x @ (q * scales + offsets).T + bias, formats as in `formats.Int4Weight`."""
    k = kernels()
    if k is None:
        return int4_linear_reference(x, qweight, scales, offsets, bias)
    if _use_tiled(x) or x.shape[-1] % GEMV_INT4_ALIGN:
        return k.int4_linear_tiled(x, qweight, scales, offsets, bias, _bf16_tiles(x))
    return k.int4_linear_gemv(x, qweight, scales, offsets, bias)


def int8_linear_reference(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """PyTorch fallback: dequantize, then F.linear in the activation dtype."""
    weight = dequantize_int8(Int8Weight(qweight, scales))
    return F.linear(x, weight.to(x.dtype), bias)


def int4_linear_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    weight = dequantize_int4(Int4Weight(qweight, scales, offsets))
    return F.linear(x, weight.to(x.dtype), bias)
