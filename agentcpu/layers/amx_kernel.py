"""Compiled bf16 linear on Intel AMX tiles (`csrc/amx_linear.cpp`), opt-in.

With `AGENTCPU_AMX_LINEAR=1`, `layers.linear.dense_linear` sends bf16 products of up to
`AMX_MAX_ROWS` rows on CPUs with AMX-BF16 (Sapphire Rapids and later) here: the weight
is read in its nn.Linear layout once per call, where PyTorch's oneDNN path reorders it
on every call. Opt-in because its speed is unmeasured: it was written on an AMX machine
in a session that ended before recording figures, and later sessions ran on CPUs without
AMX (docs/kernels.md says what to measure). Its tests run wherever AMX exists. Built
once per CPU by `hardware.native_build`; None where it cannot be built, the OS does not
grant the tile state, or the variable is unset.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from types import ModuleType

from agentcpu.hardware.cpu_features import detect_cpu
from agentcpu.hardware.native_build import build_extension

SOURCE = Path(__file__).with_name("csrc") / "amx_linear.cpp"
DECLARATIONS = """
bool amx_bf16_available();
at::Tensor amx_bf16_linear(const at::Tensor& x, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias);
"""
TILE_ROWS = 16  # weight rows per tile: N must be a multiple
TILE_K = 32  # bf16 values per tile row: K must be a multiple


ENABLE_ENV = "AGENTCPU_AMX_LINEAR"


def amx_kernel() -> ModuleType | None:
    """The tile kernel where `AGENTCPU_AMX_LINEAR=1` and the CPU and OS allow it."""
    return built_amx_kernel() if os.environ.get(ENABLE_ENV) == "1" else None


@functools.cache
def built_amx_kernel() -> ModuleType | None:
    """The tile kernel wherever it can run, enabled or not (its tests use this)."""
    if not detect_cpu().amx_bf16:
        return None
    module = build_extension("amx", SOURCE, DECLARATIONS, ["amx_bf16_available", "amx_bf16_linear"])
    if module is None or not module.amx_bf16_available():
        return None
    return module


def amx_shape_ok(weight_shape: tuple[int, ...]) -> bool:
    """Whether a [N, K] weight tiles exactly (every supported model's projections do;
    odd test shapes take PyTorch's path)."""
    n, k = weight_shape
    return n % TILE_ROWS == 0 and k % TILE_K == 0
