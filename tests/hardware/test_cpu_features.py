from pathlib import Path

import pytest

from agentcpu.hardware.cpu_features import (
    ALL_FEATURES,
    ARM_FEATURES,
    X86_FEATURES,
    detect_cpu,
    parse_cpuinfo,
)

X86_FLAGS = (
    "fpu vme sse sse2 avx avx2 fma avx512f avx512dq avx512_bf16 avx512_vnni "
    "amx_bf16 amx_tile amx_int8"
)
X86_CPUINFO = f"""processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
physical id\t: 0
core id\t\t: 0
cpu cores\t: 2
flags\t\t: {X86_FLAGS}

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
physical id\t: 0
core id\t\t: 0
cpu cores\t: 2
flags\t\t: {X86_FLAGS}

processor\t: 2
model name\t: Intel(R) Xeon(R) Platinum 8480+
physical id\t: 0
core id\t\t: 1
flags\t\t: {X86_FLAGS}

"""

ARM_BLOCK = """processor\t: {i}
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid sve sve2 bf16 i8mm
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd4f
CPU revision\t: 1
"""
ARM_CPUINFO = "\n".join(ARM_BLOCK.format(i=i) for i in range(4))


def test_parse_x86_sample():
    parsed = parse_cpuinfo(X86_CPUINFO)
    assert parsed["arch"] == "x86_64"
    assert parsed["model_name"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert parsed["logical_cores"] == 3
    assert parsed["physical_cores"] == 2  # processors 0 and 1 are SMT siblings
    assert {"amx_bf16", "amx_tile", "amx_int8", "avx512f", "avx512_vnni"} <= parsed["flags"]
    assert "sve" not in parsed["flags"]


def test_parse_arm_sample():
    parsed = parse_cpuinfo(ARM_CPUINFO)
    assert parsed["arch"] == "aarch64"
    assert parsed["model_name"] == "Arm implementer 0x41 part 0xd4f"
    assert parsed["logical_cores"] == parsed["physical_cores"] == 4
    assert {"asimd", "sve", "sve2", "bf16", "i8mm"} <= parsed["flags"]


def test_parse_empty_text():
    parsed = parse_cpuinfo("")
    assert parsed["arch"] == "" and parsed["flags"] == frozenset()
    assert parsed["logical_cores"] == 0


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return str(path)


def test_detect_x86_sample_features(tmp_path):
    cpu = detect_cpu(_write(tmp_path, X86_CPUINFO))
    assert all(getattr(cpu, name) for name in X86_FEATURES)
    assert not any(getattr(cpu, name) for name in ARM_FEATURES)
    assert (cpu.physical_cores, cpu.logical_cores) == (2, 3)


def test_detect_arm_sample_features(tmp_path):
    cpu = detect_cpu(_write(tmp_path, ARM_CPUINFO))
    assert all(getattr(cpu, name) for name in ARM_FEATURES)  # asimd counts as neon
    assert not any(getattr(cpu, name) for name in X86_FEATURES)


def test_detect_without_cpuinfo_falls_back(tmp_path):
    cpu = detect_cpu(str(tmp_path / "missing"))
    assert not any(getattr(cpu, name) for name in ALL_FEATURES)
    assert cpu.physical_cores >= 1 and cpu.logical_cores >= 1
    assert cpu.model_name


def test_cpu_info_is_frozen_and_serialisable(tmp_path):
    cpu = detect_cpu(_write(tmp_path, X86_CPUINFO))
    with pytest.raises(AttributeError):
        cpu.avx2 = False  # type: ignore[misc]
    assert cpu.to_dict()["amx_bf16"] is True


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs Linux /proc/cpuinfo")
def test_detect_this_machine_agrees_with_proc_cpuinfo():
    text = Path("/proc/cpuinfo").read_text()
    first = next(line for line in text.splitlines() if line.lower().startswith(("flags", "features")))
    flags = set(first.split(":", 1)[1].split())
    cpu = detect_cpu()
    for field, names in {**X86_FEATURES, **ARM_FEATURES}.items():
        assert getattr(cpu, field) == any(name in flags for name in names), field
    assert cpu.logical_cores == (parse_cpuinfo(text)["logical_cores"] or cpu.logical_cores)
    assert cpu.torch_capability
