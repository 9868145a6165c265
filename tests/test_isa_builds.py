"""The AMX kernels compile on any x86 machine the suite runs on. A CPU without AMX builds
none of them, so an edit made there could break them unseen (session 23's did: the AMX
prefill attention stopped compiling and AMX machines fell back to PyTorch's SDPA).
`scripts/check_isa_builds.py` with no `--only` checks every extension for every target."""

import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "check_isa_builds.py"
AMX_EXTENSIONS = ["amx", "bf16_packed", "quant", "prefill_attention"]  # #ifdef AGENTCPU_AMX


def _gxx_knows(march: str) -> bool:
    probe = subprocess.run(
        ["g++", f"-march={march}", "-x", "c++", "-fsyntax-only", "-"],
        input="int main() {}",
        capture_output=True,
        text=True,
    )
    return probe.returncode == 0


@pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64") or shutil.which("g++") is None,
    reason="the kernels are x86 C++ built with g++",
)
def test_amx_paths_compile_here_too():
    if not _gxx_knows("sapphirerapids"):
        pytest.skip("this g++ predates -march=sapphirerapids")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--march", "sapphirerapids", "--only", *AMX_EXTENSIONS],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    checked = [line.split()[0] for line in done.stdout.splitlines() if line.endswith(" ok")]
    assert sorted(checked) == sorted(AMX_EXTENSIONS)
