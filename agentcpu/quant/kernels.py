"""Compiled int8 / int4 linear kernels (`csrc/quant_kernels.cpp`), built once per CPU.

The C++ source is compiled with `torch.utils.cpp_extension.load_inline` on first use and
cached in torch's extension directory (`TORCH_EXTENSIONS_DIR`, default
`~/.cache/torch_extensions`). The build targets this CPU (`-march=native`), so the
cache name carries a digest of the CPU flags: a cache shared between machines never
runs code built for another CPU. Where no kernel can be built (no AVX2, not x86, no
compiler or ninja) `kernels()` returns None and the modules use the PyTorch fallback.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
from pathlib import Path
from types import ModuleType

from agentcpu.hardware.cpu_features import detect_cpu

log = logging.getLogger(__name__)

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
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno"]
DISABLE_ENV = "AGENTCPU_QUANT_KERNELS"  # set to "0" to force the PyTorch fallback


def _cpu_digest() -> str:
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return hashlib.sha1(f"{platform.machine()} {flags}".encode()).hexdigest()[:10]


def kernels_supported() -> bool:
    """The compiled kernels need x86-64 with AVX2 and FMA (every AVX-512 CPU has both)."""
    cpu = detect_cpu()
    return platform.machine() in ("x86_64", "AMD64") and cpu.avx2 and cpu.fma


@functools.cache
def kernels() -> ModuleType | None:
    """The compiled kernel module, or None where it cannot be built (logged once)."""
    if os.environ.get(DISABLE_ENV) == "0" or not kernels_supported():
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        return load_inline(
            name=f"agentcpu_quant_{_cpu_digest()}",
            cpp_sources=[DECLARATIONS, SOURCE.read_text()],
            functions=FUNCTIONS,
            extra_cflags=CFLAGS,
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # compiler, ninja or headers missing: fall back, loudly
        log.warning("quantized kernels unavailable, using the PyTorch fallback: %s", exc)
        return None


@functools.cache
def native_bf16_matmul() -> bool:
    """Whether bf16 matmul is fast here (AMX or AVX-512 BF16); else tiles run in fp32."""
    cpu = detect_cpu()
    return cpu.amx_bf16 or cpu.avx512_bf16
