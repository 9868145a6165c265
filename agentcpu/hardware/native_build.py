"""Build the project's own C++ kernels for this CPU, once, and say where they may run.

Every kernel source is compiled with `torch.utils.cpp_extension.load_inline` on first use
and cached in torch's extension directory (`TORCH_EXTENSIONS_DIR`, default
`~/.cache/torch_extensions`). The build targets this CPU (`-march=native`), so the cache
name carries a digest of the CPU flags: a cache shared between machines never runs code
built for another CPU. Where nothing can be built (no AVX2, not x86, no compiler or
ninja) `build_extension` returns None and callers use their PyTorch path.

`AGENTCPU_NATIVE_KERNELS=0` disables every compiled kernel (the PyTorch paths then run).
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

CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno"]
DISABLE_ENV = "AGENTCPU_NATIVE_KERNELS"


def cpu_digest() -> str:
    """A short digest of this CPU's architecture and feature flags."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return hashlib.sha1(f"{platform.machine()} {flags}".encode()).hexdigest()[:10]


def avx2_kernels_supported() -> bool:
    """Our kernels need x86-64 with AVX2 and FMA (every AVX-512 CPU has both)."""
    cpu = detect_cpu()
    return platform.machine() in ("x86_64", "AMD64") and cpu.avx2 and cpu.fma


@functools.cache
def native_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AMX / AVX-512 BF16, or Arm
    BF16). Without it PyTorch's bf16 GEMM falls back to a slow reference loop (measured
    on an AVX2-only EPYC: 1 GFLOPS at 8 rows vs 27 for fp32), while its bf16 GEMV (one
    row) still streams the weights at full bandwidth."""
    cpu = detect_cpu()
    return cpu.amx_bf16 or cpu.avx512_bf16 or (cpu.arch == "aarch64" and cpu.bf16)


def build_extension(
    name: str,
    source: Path,
    declarations: str,
    functions: list[str],
    prelude: tuple[Path, ...] = (),
) -> ModuleType | None:
    """Compile `source` (cached per CPU) exposing `functions`; None where it cannot be.
    `prelude`: headers whose text goes before the source (not `#include`d: the build
    cache keys on the source text, so a changed header must be part of it)."""
    if os.environ.get(DISABLE_ENV) == "0" or not avx2_kernels_supported():
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        return load_inline(
            name=f"agentcpu_{name}_{cpu_digest()}",
            cpp_sources=[
                declarations,
                *(p.read_text() for p in prelude),
                source.read_text(),
                address_table(functions),
            ],
            functions=[*functions, ADDRESS_TABLE],
            extra_cflags=CFLAGS,
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # compiler, ninja or headers missing: fall back, loudly
        log.warning("compiled %s kernels unavailable, using the PyTorch path: %s", name, exc)
        return None


ADDRESS_TABLE = "agentcpu_addresses"


def address_table(functions: list[str]) -> str:
    """C++ for `agentcpu_addresses()`: the address of each of `functions`, by name.

    Lets one extension call another's ops without Python in between: the decode stack
    (`layers/decode_stack.py`) runs a whole decode step in one native call through
    these addresses. The caller casts each address back to the function's C++ type,
    so it must declare the same signature as the `declarations` here (both sides are
    compiled by this module against the same torch headers)."""
    entries = ", ".join(f'{{"{f}", reinterpret_cast<int64_t>(&{f})}}' for f in functions)
    return f"std::map<std::string, int64_t> {ADDRESS_TABLE}() {{ return {{{entries}}}; }}\n"


def kernel_addresses(module: ModuleType) -> dict[str, int]:
    """Name -> address of the ops of an extension built by `build_extension`."""
    return dict(getattr(module, ADDRESS_TABLE)())


def build_probed_extension(
    name: str,
    source: Path,
    declarations: str,
    functions: list[str],
    prelude: tuple[Path, ...] = (),
    *,
    cpu_has_path: bool = True,
) -> ModuleType | None:
    """`build_extension` for a source whose fast path depends on the instruction set it
    is compiled for: None unless the build took that path (`functions[0]` is the
    source's `*_available()` probe). `cpu_has_path=False` (e.g. `detect_cpu().avx512_bf16`
    for an AVX-512 BF16 source) skips a build that could only produce the slow path."""
    if not cpu_has_path:
        return None
    module = build_extension(name, source, declarations, functions, prelude)
    if module is None or not getattr(module, functions[0])():
        return None
    return module
