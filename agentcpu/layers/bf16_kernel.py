"""Compiled bf16-weight linear for batched decode (`csrc/bf16_linear.cpp`).

Used by `layers.linear.dense_linear` for 2..`SMALL_BATCH_MAX_ROWS` rows on CPUs without
native bf16 matmul, where PyTorch would either run its slow bf16 reference GEMM or need
the whole weight widened to fp32 first. Built once per CPU by `hardware.native_build`;
None where it cannot be built.
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import ModuleType

from agentcpu.hardware.native_build import build_extension

SOURCE = Path(__file__).with_name("csrc") / "bf16_linear.cpp"
DECLARATIONS = """
at::Tensor bf16_linear_small_batch(const at::Tensor& x, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias);
"""


@functools.cache
def bf16_kernel() -> ModuleType | None:
    return build_extension("bf16", SOURCE, DECLARATIONS, ["bf16_linear_small_batch"])
