"""What the CPU can do: model, cores, and the AI instruction sets we care about.

Read from /proc/cpuinfo (x86 lists "flags", Arm lists "Features"), so a feature counts
only if the kernel exposes it to us: a VM that hides AVX-512 or AMX reports them False,
which is also what our kernels will see. Where /proc/cpuinfo is absent every feature is
False and core counts fall back to `os.cpu_count()`.
"""

from __future__ import annotations

import dataclasses
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CPUINFO_PATH = "/proc/cpuinfo"

# CpuInfo field -> the /proc/cpuinfo names that mean it (any one suffices).
X86_FEATURES: dict[str, tuple[str, ...]] = {
    "amx_bf16": ("amx_bf16",),
    "amx_int8": ("amx_int8",),
    "amx_tile": ("amx_tile",),
    "avx512f": ("avx512f",),
    "avx512_bf16": ("avx512_bf16",),
    "avx512_vnni": ("avx512_vnni",),
    "avx2": ("avx2",),
    "fma": ("fma",),
}
# 64-bit Arm kernels call NEON "asimd"; 32-bit ones call it "neon".
ARM_FEATURES: dict[str, tuple[str, ...]] = {
    "neon": ("asimd", "neon"),
    "sve": ("sve",),
    "sve2": ("sve2",),
    "bf16": ("bf16",),
    "i8mm": ("i8mm",),
}
ALL_FEATURES = (*X86_FEATURES, *ARM_FEATURES)


@dataclass(frozen=True)
class CpuInfo:
    """This machine's CPU as agentcpu sees it (see module docstring for the sources)."""

    arch: str
    model_name: str
    physical_cores: int
    logical_cores: int
    torch_capability: str
    amx_bf16: bool = False
    amx_int8: bool = False
    amx_tile: bool = False
    avx512f: bool = False
    avx512_bf16: bool = False
    avx512_vnni: bool = False
    avx2: bool = False
    fma: bool = False
    neon: bool = False
    sve: bool = False
    sve2: bool = False
    bf16: bool = False
    i8mm: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _blocks(text: str) -> list[dict[str, str]]:
    """One dict per blank-line-separated block of `key : value` lines."""
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if current:
                blocks.append(current)
            current = {}
            continue
        current[key.strip().lower()] = value.strip()
    if current:
        blocks.append(current)
    return blocks


def _first(blocks: list[dict[str, str]], *keys: str) -> str:
    for block in blocks:
        for key in keys:
            if block.get(key):
                return block[key]
    return ""


def _arch(blocks: list[dict[str, str]]) -> str:
    if _first(blocks, "flags"):
        return "x86_64"
    if _first(blocks, "features"):
        return "aarch64"
    return ""


def _arm_model_name(blocks: list[dict[str, str]]) -> str:
    implementer = _first(blocks, "cpu implementer")
    part = _first(blocks, "cpu part")
    return f"Arm implementer {implementer} part {part}" if implementer else ""


def _physical_cores(processors: list[dict[str, str]]) -> int:
    """Distinct (package, core) pairs; without them (Arm, VMs) every processor is a core."""
    pairs = {
        (block.get("physical id"), block.get("core id"))
        for block in processors
        if "core id" in block
    }
    return len(pairs) or len(processors)


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """Parse /proc/cpuinfo text.

    Returns `arch` ('x86_64' / 'aarch64' / '' if unknown), `model_name`,
    `logical_cores`, `physical_cores` and `flags` (a frozenset of the first processor's
    x86 flags or Arm features, lower case).
    """
    blocks = _blocks(text)
    processors = [block for block in blocks if "processor" in block]
    flags = _first(processors or blocks, "flags", "features")
    model_name = _first(blocks, "model name", "hardware") or _arm_model_name(blocks)
    return {
        "arch": _arch(processors or blocks),
        "model_name": model_name,
        "logical_cores": len(processors),
        "physical_cores": _physical_cores(processors),
        "flags": frozenset(flags.lower().split()),
    }


def _feature_booleans(flags: frozenset[str]) -> dict[str, bool]:
    table = {**X86_FEATURES, **ARM_FEATURES}
    return {field: any(name in flags for name in names) for field, names in table.items()}


def _normalise_arch(machine: str) -> str:
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine.lower(), machine.lower())


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def detect_cpu(cpuinfo_path: str = CPUINFO_PATH) -> CpuInfo:
    """Describe this machine's CPU; never raises (missing data reads as False / 0)."""
    parsed = parse_cpuinfo(_read_text(cpuinfo_path))
    fallback_cores = os.cpu_count() or 1
    return CpuInfo(
        arch=_normalise_arch(platform.machine()) or parsed["arch"],
        model_name=parsed["model_name"] or platform.processor() or "unknown",
        physical_cores=parsed["physical_cores"] or fallback_cores,
        logical_cores=parsed["logical_cores"] or fallback_cores,
        torch_capability=torch.backends.cpu.get_cpu_capability(),
        **_feature_booleans(parsed["flags"]),
    )
