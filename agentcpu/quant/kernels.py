"""Compiled int8 / int4 linear kernels (`csrc/quant_kernels.cpp`), built once per CPU
by `hardware.native_build` (cached, `-march=native`). Where no kernel can be built
`kernels()` returns None and the modules use the PyTorch fallback.
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import ModuleType

from agentcpu.hardware.native_build import build_extension, native_bf16_matmul
from agentcpu.layers.bf16_kernel import PACKED_PRELUDE

__all__ = ["kernels", "native_bf16_matmul"]

SOURCE = Path(__file__).with_name("csrc") / "quant_kernels.cpp"
# weight quantization at load, compiled into the same module (one build)
QUANTIZE_SOURCE = Path(__file__).with_name("csrc") / "quantize.cpp"
# int8 batches on VNNI (products in int32, no dequantization), also in the same module
VNNI_SOURCE = Path(__file__).with_name("csrc") / "int8_vnni.cpp"
# the packed bf16 tile, for the batch path on AVX-512 BF16 (`layers/csrc`)
FUNCTIONS = [
    "int8_linear_gemv",
    "int4_linear_gemv",
    "int8_linear_tiled",
    "int4_linear_tiled",
    "quant_packed_available",
    "int8_linear_packed",
    "int4_linear_packed",
    "int8_vnni_available",
    "int8_linear_vnni",
    "quantize_int8_native",
    "quantize_int4_native",
]
DECLARATIONS = """
at::Tensor int8_linear_gemv(const at::Tensor& x, const at::Tensor& qweight,
    const at::Tensor& scales, const c10::optional<at::Tensor>& bias);
at::Tensor int4_linear_gemv(const at::Tensor& x, const at::Tensor& qweight,
    const at::Tensor& scales, const at::Tensor& offsets, const c10::optional<at::Tensor>& bias);
at::Tensor int8_linear_tiled(const at::Tensor& x, const at::Tensor& qweight,
    const at::Tensor& scales, const c10::optional<at::Tensor>& bias, bool bf16);
at::Tensor int4_linear_tiled(const at::Tensor& x, const at::Tensor& qweight,
    const at::Tensor& scales, const at::Tensor& offsets, const c10::optional<at::Tensor>& bias,
    bool bf16);
bool quant_packed_available();
at::Tensor int8_linear_packed(const at::Tensor& x, const at::Tensor& qweight,
    const at::Tensor& scales, const c10::optional<at::Tensor>& bias);
at::Tensor int4_linear_packed(const at::Tensor& x, const at::Tensor& qweight,
    const at::Tensor& scales, const at::Tensor& offsets, const c10::optional<at::Tensor>& bias);
bool int8_vnni_available();
at::Tensor int8_linear_vnni(const at::Tensor& x, const at::Tensor& qweight,
    const at::Tensor& scales, const c10::optional<at::Tensor>& bias);
std::tuple<at::Tensor, at::Tensor> quantize_int8_native(const at::Tensor& weight, int64_t group);
std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t> quantize_int4_native(const at::Tensor& weight,
    int64_t group, bool symmetric);
"""


@functools.cache
def kernels() -> ModuleType | None:
    """The compiled kernel module, or None where it cannot be built (logged once)."""
    return build_extension(
        "quant", SOURCE, DECLARATIONS, FUNCTIONS, prelude=(*PACKED_PRELUDE, QUANTIZE_SOURCE, VNNI_SOURCE)
    )
