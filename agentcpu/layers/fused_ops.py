"""Compiled fused decoder ops (`csrc/fused_ops.cpp`): RMSNorm, rotary embedding in place,
SiLU-and-multiply, one-token-per-sequence attention over paged KV slots and greedy
sampling's argmax; and, on
AVX-512 BF16 CPUs, a prefill chunk's attention over its paged context
(`csrc/prefill_attention.cpp`).

A decode step runs ~40 small PyTorch ops per layer whose dispatch costs more than their
arithmetic; these kernels replace most of them. Each rounds to the tensor dtype where
the Hugging Face reference does, so outputs match the unfused ops up to summation order.
Built once per CPU by `hardware.native_build`; `fused()` is None where nothing can be
built, and the layers keep their PyTorch code.
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import ModuleType

import torch

from agentcpu.hardware.cpu_features import detect_cpu
from agentcpu.hardware.native_build import (
    build_extension,
    build_probed_extension,
)
from agentcpu.layers.bf16_kernel import AMX_TILES, AVX2_MATH, GIL, TENSOR_ROWS

SOURCE = Path(__file__).with_name("csrc") / "fused_ops.cpp"
DECLARATIONS = """
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& residual,
    const at::Tensor& x, const at::Tensor& weight, double eps);
void rope_inplace(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos_sin,
    const at::Tensor& positions);
at::Tensor silu_mul(const at::Tensor& gate_up);
void kv_write(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots,
    const at::Tensor& k, const at::Tensor& v);
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
    const at::Tensor& v_cache, const at::Tensor& slots, const at::Tensor& lens, double scale);
at::Tensor argmax_rows(const at::Tensor& logits);
"""
FUNCTIONS = [
    "rms_norm",
    "add_rms_norm",
    "rope_inplace",
    "silu_mul",
    "kv_write",
    "decode_attention",
    "argmax_rows",
]
ATTENTION_COMMON = Path(__file__).with_name("csrc") / "bf16_attention_common.h"
DECODE_CHUNKS = Path(__file__).with_name("csrc") / "decode_chunks.h"  # both decode kernels' work split
PREFILL_SOURCE = Path(__file__).with_name("csrc") / "prefill_attention.cpp"
PREFILL_DECLARATIONS = """
bool prefill_attention_available();
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k_cache,
    const at::Tensor& v_cache, const at::Tensor& slots, double scale);
int64_t prefill_attention_uses_amx(int64_t use);
"""
PREFILL_AVX2_SOURCE = Path(__file__).with_name("csrc") / "prefill_attention_avx2.cpp"
PREFILL_AVX2_DECLARATIONS = """
bool prefill_attention_avx2_available();
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k_cache,
    const at::Tensor& v_cache, const at::Tensor& slots, double scale);
"""
PREFILL_HEAD_DIMS = (64, 128)
DECODE_SOURCE = Path(__file__).with_name("csrc") / "decode_attention_bf16.cpp"
DECODE_DECLARATIONS = """
bool decode_attention_bf16_available();
at::Tensor decode_attention_bf16(const at::Tensor& q, const at::Tensor& k_cache,
    const at::Tensor& v_cache, const at::Tensor& slots, const at::Tensor& lens, double scale);
"""
DECODE_MAX_GROUP = 8  # query heads per KV head the bf16 decode kernel takes
DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def fused() -> ModuleType | None:
    return build_extension(
        "fused", SOURCE, DECLARATIONS, FUNCTIONS, (AVX2_MATH, TENSOR_ROWS, GIL, DECODE_CHUNKS)
    )


@functools.cache
def prefill_attention_kernel() -> ModuleType | None:
    """Causal attention of a bf16 prefill chunk over its paged context: AMX tiles or
    VDPBF16PS where the CPU has AVX-512 BF16 (`csrc/prefill_attention.cpp`), fp32 FMAs on the widened
    cache where it has AVX2 only (`csrc/prefill_attention_avx2.cpp`); else None. Both
    expose `prefill_attention(q, k_cache, v_cache, slots, scale)`."""
    if detect_cpu().avx512_bf16:
        return build_probed_extension(
            "prefill_attention",
            PREFILL_SOURCE,
            PREFILL_DECLARATIONS,
            ["prefill_attention_available", "prefill_attention", "prefill_attention_uses_amx"],
            (AMX_TILES, ATTENTION_COMMON),
        )
    return build_probed_extension(
        "prefill_attention_avx2",
        PREFILL_AVX2_SOURCE,
        PREFILL_AVX2_DECLARATIONS,
        ["prefill_attention_avx2_available", "prefill_attention"],
        (AVX2_MATH, ATTENTION_COMMON),
    )


@functools.cache
def decode_attention_kernel() -> ModuleType | None:
    """bf16 decode attention with VDPBF16PS (`csrc/decode_attention_bf16.cpp`), where
    the CPU has AVX-512 BF16; else None."""
    return build_probed_extension(
        "decode_attention_bf16",
        DECODE_SOURCE,
        DECODE_DECLARATIONS,
        ["decode_attention_bf16_available", "decode_attention_bf16"],
        (ATTENTION_COMMON, GIL, DECODE_CHUNKS),
        cpu_has_path=detect_cpu().avx512_bf16,
    )


def fused_for(x: torch.Tensor) -> ModuleType | None:
    """The compiled ops if they handle `x`'s dtype, else None (the engine runs on the
    CPU only; this sits on the hot path, so it checks no more than that)."""
    return fused() if x.dtype in DTYPES else None
