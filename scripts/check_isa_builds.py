"""Compile every native extension for each x86 instruction set we ship paths for, not
only this CPU's: a kernel edit that breaks a path this machine does not build (AMX on a
Zen 4, AVX-512 BF16 on a Zen 3) otherwise goes unnoticed until a user's first start,
where the extension fails to build and the engine silently falls back to PyTorch.

    python scripts/check_isa_builds.py [--march sapphirerapids cooperlake icelake-server znver3]
        [--only amx prefill_attention] [--jobs 2]

Each extension's C++ is taken exactly as `native_build.build_extension` would hand it to
`load_inline` (declarations, prelude headers, source, address table), then checked with
`g++ -fsyntax-only -march=<target>` against torch's headers. Default targets: AMX
(sapphirerapids), AVX-512 BF16 without AMX (cooperlake), AVX-512 without BF16
(icelake-server), AVX2 (znver3). Each check takes ~13 s (torch's headers); 10 extensions
x 4 targets take ~5 min on 2 cores. Exits 1 if any fails, printing its first errors.

Session 24 found with it that the AMX prefill path had not compiled since a signature
change of session 23 (made on a CPU without AMX).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DEFAULT_TARGETS = ["sapphirerapids", "cooperlake", "icelake-server", "znver3"]


def captured_sources() -> dict[str, list[str]]:
    """Extension name -> the C++ sources `load_inline` would get, for every extension
    the builders ask for on this machine, plus the ones gated off by its CPU (the AMX
    GEMM, the AVX2 prefill attention)."""
    import torch.utils.cpp_extension as cpp_extension

    captured: dict[str, list[str]] = {}

    def capture(name, cpp_sources, **_kwargs):
        captured[name.removeprefix("agentcpu_").rsplit("_", 1)[0]] = list(cpp_sources)
        raise RuntimeError("captured, not built")

    cpp_extension.load_inline = capture
    from agentcpu.hardware import native_build
    from agentcpu.layers import amx_kernel, bf16_kernel, fused_ops
    from agentcpu.models import decode_stack
    from agentcpu.quant import kernels as quant_kernels

    builders = [
        fused_ops.fused,
        fused_ops.prefill_attention_kernel,
        fused_ops.decode_attention_kernel,
        bf16_kernel.bf16_kernel,
        bf16_kernel.bf16_dot_kernel,
        bf16_kernel.bf16_packed_kernel,
        decode_stack.stack_kernel,
        quant_kernels.kernels,
    ]
    for builder in builders:
        builder()  # the build fails on purpose; the builders return None then
    native_build.build_extension(
        "amx", amx_kernel.SOURCE, amx_kernel.DECLARATIONS, ["amx_bf16_available"]
    )
    native_build.build_extension(
        "prefill_attention_avx2",
        fused_ops.PREFILL_AVX2_SOURCE,
        fused_ops.PREFILL_AVX2_DECLARATIONS,
        ["prefill_attention_avx2_available"],
        (fused_ops.AVX2_MATH, fused_ops.ATTENTION_COMMON),
    )
    return captured


def syntax_check(source: Path, march: str, includes: list[str]) -> str:
    """'' if `source` compiles for `march`, else its first error lines."""
    cmd = ["g++", "-std=c++17", "-fsyntax-only", f"-march={march}", "-fopenmp", *includes]
    done = subprocess.run([*cmd, str(source)], capture_output=True, text=True)
    if done.returncode == 0:
        return ""
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    return "\n".join(errors[:3]) or done.stderr[-500:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--march", nargs="+", default=DEFAULT_TARGETS)
    parser.add_argument("--only", nargs="*", default=[], help="these extensions (default: all)")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    from torch.utils.cpp_extension import include_paths

    includes = [f"-I{p}" for p in [*include_paths(), sysconfig.get_paths()["include"]]]
    sources = captured_sources()
    if missing := set(args.only) - set(sources):
        print(f"no extension named {sorted(missing)}; there are {sorted(sources)}", file=sys.stderr)
        return 2
    sources = {k: v for k, v in sources.items() if not args.only or k in args.only}
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for name, parts in sources.items():
            files[name] = Path(tmp) / f"{name}.cpp"
            files[name].write_text("\n".join(["#include <torch/extension.h>", *parts]))
        jobs = [(name, march) for name in sorted(files) for march in args.march]
        with ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(lambda j: syntax_check(files[j[0]], j[1], includes), jobs))
    failed = 0
    for (name, march), errors in zip(jobs, results, strict=True):
        print(f"{name:28s} {march:16s} {'ok' if not errors else 'FAILED'}")
        if errors:
            failed += 1
            print("    " + errors.replace("\n", "\n    "))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
