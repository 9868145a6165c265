"""What this machine can do: CPU features, measured bandwidth and FLOP/s, rooflines, and
the thread count torch computes with. `agentcpu doctor` is `doctor.run_doctor`."""

from agentcpu.hardware.cpu_features import CpuInfo, detect_cpu
from agentcpu.hardware.doctor import doctor_report, format_doctor
from agentcpu.hardware.roofline import ModelFootprint, model_footprint, roofline, roofline_for_quant
from agentcpu.hardware.threads import configure_threads

__all__ = [
    "CpuInfo",
    "ModelFootprint",
    "configure_threads",
    "detect_cpu",
    "doctor_report",
    "format_doctor",
    "model_footprint",
    "roofline",
    "roofline_for_quant",
]
