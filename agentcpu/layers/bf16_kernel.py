"""Compiled bf16-weight linears.

- `bf16_packed_kernel()` (`csrc/bf16_packed_linear.cpp`): CPUs with AVX-512 BF16 or
  AVX2 + FMA; the weight repacked once at load into VDPBF16PS operand order
  (`layers.packed_linear`), every batch size. On AVX2 the tile widens each packed line
  to fp32 in registers (`csrc/bf16_packed_tile.h`).
- `bf16_dot_kernel()` (`csrc/bf16_dot_linear.cpp`): CPUs with AVX-512 BF16; VDPBF16PS
  dot products, the weight read once per call in place. `layers.linear.dense_linear`
  sends bf16 products of up to `DOT_MAX_ROWS` rows to it (oneDNN's GEMM wins above):
  weights that are not packed (a tied LM head, shapes that do not pack).
- `bf16_kernel()` (`csrc/bf16_linear.cpp`): AVX2 CPUs without native bf16 matmul, where
  PyTorch would either run its slow bf16 reference GEMM or need the whole weight widened
  to fp32 first; fp32 FMAs on weights widened in registers, the weight in place (layers
  that were not packed).

Each is built once per CPU by `hardware.native_build`; None where it cannot be built.
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import ModuleType

from agentcpu.hardware.cpu_features import detect_cpu
from agentcpu.hardware.native_build import (
    build_extension,
    build_probed_extension,
)

CSRC = Path(__file__).with_name("csrc")
PACKED_TILE = CSRC / "bf16_packed_tile.h"  # shared entry + packed tile (also for quant/)
AVX2_MATH = CSRC / "avx2_math.h"  # bf16 <-> fp32, exp, horizontal max / min, int8 packing
TENSOR_ROWS = CSRC / "tensor_rows.h"  # [..., K] <-> [rows, K] without an op when already 2-D
GIL = CSRC / "gil.h"  # release the GIL while a kernel runs, unless the decode stack did
# what every user of the packed tile puts first
AMX_TILES = CSRC / "amx_tiles.h"  # AMX permission + tile configuration (AMX builds only)
PACKED_PRELUDE = (AVX2_MATH, TENSOR_ROWS, GIL, AMX_TILES, PACKED_TILE)
DECLARATIONS = """
at::Tensor bf16_linear_small_batch(const at::Tensor& x, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias);
"""
DOT_DECLARATIONS = """
bool bf16_dot_available();
at::Tensor bf16_dot_linear(const at::Tensor& x, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias);
"""
PACKED_DECLARATIONS = """
bool bf16_packed_available();
at::Tensor bf16_packed_linear(const at::Tensor& x, const at::Tensor& packed,
    const c10::optional<at::Tensor>& bias);
int64_t bf16_packed_amx_min_rows(int64_t rows);
void bf16_pack_weight(const at::Tensor& weight, at::Tensor& packed);
"""


@functools.cache
def bf16_kernel() -> ModuleType | None:
    return build_extension(
        "bf16", CSRC / "bf16_linear.cpp", DECLARATIONS, ["bf16_linear_small_batch"]
    )


@functools.cache
def bf16_dot_kernel() -> ModuleType | None:
    return _linear_extension("dot", DOT_DECLARATIONS, cpu_has_path=detect_cpu().avx512_bf16)


@functools.cache
def bf16_packed_kernel() -> ModuleType | None:
    return _linear_extension(
        "packed", PACKED_DECLARATIONS, cpu_has_path=True, extra=["bf16_packed_amx_min_rows", "bf16_pack_weight"]
    )


def _linear_extension(
    name: str, declarations: str, cpu_has_path: bool, extra: list[str] | None = None
) -> ModuleType | None:
    """`csrc/bf16_<name>_linear.cpp` (with the packed tile's header before it) where it
    builds with its fast path, else None."""
    functions = [f"bf16_{name}_available", f"bf16_{name}_linear", *(extra or [])]
    source = CSRC / f"bf16_{name}_linear.cpp"
    return build_probed_extension(
        f"bf16_{name}", source, declarations, functions, PACKED_PRELUDE, cpu_has_path=cpu_has_path
    )
