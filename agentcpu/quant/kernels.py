"""Compiled int8 / int4 linear kernels (`csrc/quant_kernels.cpp`), built once per CPU
by `hardware.native_build` (cached, `-march=native`). Where no kernel can be built
`kernels()` returns None and the modules use the PyTorch fallback.
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import ModuleType

from agentcpu.hardware.native_build import build_extension, native_bf16_matmul

__all__ = ["kernels", "native_bf16_matmul"]

SOURCE = Path(__file__).with_name("csrc") / "quant_kernels.cpp"
FUNCTIONS = ["int8_linear_gemv", "int4_linear_gemv", "int8_linear_tiled", "int4_linear_tiled"]
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
"""


@functools.cache
def kernels() -> ModuleType | None:
    """The compiled kernel module, or None where it cannot be built (logged once)."""
    return build_extension("quant", SOURCE, DECLARATIONS, FUNCTIONS)
