"""`agentcpu doctor [--json] [--model PATH] [--quick]`."""

from agentcpu.hardware.doctor import add_doctor_arguments as add_arguments
from agentcpu.hardware.doctor import run_doctor as run

__all__ = ["add_arguments", "run"]
