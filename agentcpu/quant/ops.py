"""int8 / int4 linear ops: pick the compiled kernel for this batch, or the PyTorch
fallback where no kernel is built (see `kernels.py`).

The GEMV kernel streams the quantized weights once per call and multiplies them with
activations quantized to int8 per 32-block; it serves every batch size on CPUs without
fast bf16 matmul (measured here on AVX2: it beats dequantize-then-fp32-GEMM up to batch
32 and beyond). bf16 batches of `packed_min_tokens()` rows or more (32 on AVX-512 BF16,
256 on AVX2) dequantize 64 weight rows at a time into the packed bf16 layout and run the
bf16 packed tile over them; elsewhere with fast bf16 matmul (AMX), batches of `TILED_MIN_TOKENS` rows
or more dequantize tiles to bf16 and multiply with oneDNN. int4 layers stored 8 rows
interleaved (the loader's default) take the GEMV at every batch size on CPUs without
native bf16 matmul. docs/quantization.md has the measurements.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from agentcpu.hardware.cpu_features import detect_cpu
from agentcpu.layers.packed_linear import BLOCK_ROWS
from agentcpu.quant.formats import (
    BLOCK,
    INTERLEAVE_ROWS,
    Int4Weight,
    Int8Weight,
    deinterleave_int4,
    dequantize_int4,
    dequantize_int8,
    int8_rows_from_panels,
    is_int8_panels,
    is_interleaved_int4,
)
from agentcpu.quant.kernels import kernels, native_bf16_matmul

TILED_MIN_TOKENS = 16
# From this many rows a bf16 batch on an AVX-512 BF16 CPU dequantizes into the packed
# bf16 layout instead (docs/quantization.md): measured crossover with the GEMV at ~32
# rows (gate_up int8: 2.73 vs 2.43 ms at 32, 6.37 vs 4.02 at 64, 12.1 vs 6.3 at 128;
# below 32 the per-call dequantization, ~0.2 ns per weight on 2 threads, loses).
PACKED_MIN_TOKENS = 32
# On AVX2 (fp32 FMAs on the packed layout) the per-call dequantization costs ~0.4 ns per
# weight on 2 threads and the tile is slower than VDPBF16PS, so the GEMV keeps batches up
# to here (Zen 3, int8 / int4-g32 ms, GEMV vs packed: gate_up 64 rows 13.3 / 14.0 vs
# 15.2 / 15.0, 128 rows 26.0 / 28.4 vs 26.1 / 25.9, 512 rows 108 / 134 vs 89 / 86; down
# 512 rows 42 / 43 vs 44 / 44).
PACKED_MIN_TOKENS_AVX2 = 256
GEMV_INT8_ALIGN = 32  # the int8 GEMV kernel works on whole 32-blocks of in_features
GEMV_INT4_ALIGN = 64  # the int4 GEMV kernel reads two 32-blocks per load


def _tokens(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def _use_tiled(rows: int, dtype: torch.dtype) -> bool:
    """Dequantize + oneDNN for big batches where bf16 matmul is fast, except for bf16
    batches on CPUs with the packed path (below its threshold the GEMV is faster than
    oneDNN's tiles there: 2.7-3.0 vs 4.9 ms for gate_up at 32 rows)."""
    if not native_bf16_matmul() or rows < TILED_MIN_TOKENS:
        return False
    return not (packed_path() and dtype == torch.bfloat16)


@functools.cache
def packed_path() -> bool:
    """Whether the kernels have the packed batch path (dequantize into the packed bf16
    layout of `layers/csrc/bf16_packed_tile.h`; AVX-512 BF16 or AVX2 + FMA)."""
    k = kernels()
    return k is not None and k.quant_packed_available()


@functools.cache
def packed_min_tokens() -> int:
    """Rows from which a bf16 batch takes the packed path on this CPU."""
    return PACKED_MIN_TOKENS if native_bf16_matmul() else PACKED_MIN_TOKENS_AVX2


def _use_packed(rows: int, dtype: torch.dtype, out_features: int, in_features: int) -> bool:
    if dtype != torch.bfloat16 or not packed_path() or rows < packed_min_tokens():
        return False
    return out_features % BLOCK_ROWS == 0 and in_features % 2 == 0


def _bf16_tiles(x: torch.Tensor) -> bool:
    """Whether the tiled kernel multiplies in bf16: only for bf16 activations, so an fp32
    model's products stay fp32 on every CPU."""
    return native_bf16_matmul() and x.dtype == torch.bfloat16


@functools.cache
def vnni_path() -> bool:
    """Whether per-channel int8 layers take the int8 VNNI path (`csrc/int8_vnni.cpp`): laid
    out in its panels at load, it serves every batch size. Not on CPUs with AMX tiles:
    there the dequantizing packed path multiplies big batches on AMX (int8 prefill 1,252
    tok/s on the Qwen2.5-0.5B shape, session 21), above what VPDPBUSD on 2 cores can give
    (~0.7 TOPS); the VNNI path is unmeasured there (docs/quantization.md)."""
    k = kernels()
    return k is not None and k.int8_vnni_available() and not detect_cpu().amx_bf16


def int8_path(rows: int, dtype: torch.dtype, qweight: torch.Tensor, scales: torch.Tensor) -> str:
    """The compiled kernel `int8_linear` runs for `rows` rows of `dtype`: "vnni" (a weight
    in panels), "packed", "tiled" or "gemv" (the decode stack asks too:
    `layers/decode_stack.py`)."""
    if is_int8_panels(qweight):
        return "vnni"
    if _use_packed(rows, dtype, qweight.shape[0], qweight.shape[1]):
        return "packed"
    group = qweight.shape[1] // scales.shape[1]
    if _use_tiled(rows, dtype) or qweight.shape[1] % GEMV_INT8_ALIGN or group % GEMV_INT8_ALIGN:
        return "tiled"
    return "gemv"


def int4_path(rows: int, dtype: torch.dtype, qweight: torch.Tensor) -> str:
    """The compiled kernel `int4_linear` runs for `rows` rows of `dtype`: "packed",
    "tiled" or "gemv"."""
    # On AVX2 the interleaved GEMV beats dequantizing into the packed layout at every
    # batch measured (Zen 3, int4-g32, 512 rows: gate_up 59 vs 75 ms, down 36 vs 63 ms)
    gemv_always = is_interleaved_int4(qweight) and not native_bf16_matmul()
    out_features, in_features = int4_shape(qweight)
    if not gemv_always and _use_packed(rows, dtype, out_features, in_features):
        return "packed"
    if _use_tiled(rows, dtype) or in_features % GEMV_INT4_ALIGN:
        return "tiled"
    return "gemv"


def int8_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """y = x @ (qweight * scales).T + bias, formats as in `formats.Int8Weight`, or laid
    out in VNNI panels (`formats.int8_panels`: 3-D qweight)."""
    k = kernels()
    if k is None:
        return int8_linear_reference(x, qweight, scales, bias)
    path = int8_path(_tokens(x), x.dtype, qweight, scales)
    if path == "vnni":
        return k.int8_linear_vnni(x, qweight, scales, bias)
    if path == "packed":
        return k.int8_linear_packed(x, qweight, scales, bias)
    if path == "tiled":
        return k.int8_linear_tiled(x, qweight, scales, bias, _bf16_tiles(x))
    return k.int8_linear_gemv(x, qweight, scales, bias)


def int4_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """y = x @ (q * scales + offsets).T + bias, formats as in `formats.Int4Weight`, or
    interleaved 8 rows a group (`formats.interleave_int4`: 3-D qweight), which every
    kernel path reads as well."""
    k = kernels()
    if k is None:
        return int4_linear_reference(x, qweight, scales, offsets, bias)
    path = int4_path(_tokens(x), x.dtype, qweight)
    if path == "packed":
        return k.int4_linear_packed(x, qweight, scales, offsets, bias)
    if path == "tiled":
        return k.int4_linear_tiled(x, qweight, scales, offsets, bias, _bf16_tiles(x))
    return k.int4_linear_gemv(x, qweight, scales, offsets, bias)


def int8_linear_reference(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """PyTorch fallback: dequantize, then F.linear in the activation dtype."""
    if is_int8_panels(qweight):
        qweight = int8_rows_from_panels(qweight)
    weight = dequantize_int8(Int8Weight(qweight, scales))
    return F.linear(x, weight.to(x.dtype), bias)


def int4_linear_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    if is_interleaved_int4(qweight):
        w = deinterleave_int4(qweight, scales, offsets)
    else:
        w = Int4Weight(qweight, scales, offsets)
    return F.linear(x, dequantize_int4(w).to(x.dtype), bias)


def int4_shape(qweight: torch.Tensor) -> tuple[int, int]:
    """(out_features, in_features) of an int4 qweight in either layout."""
    if is_interleaved_int4(qweight):
        return qweight.shape[0] * INTERLEAVE_ROWS, qweight.shape[1] * BLOCK
    return qweight.shape[0], qweight.shape[1] * 2
