"""How many threads torch computes with."""

from __future__ import annotations

import os

import torch

from agentcpu.errors import InvalidRequestError
from agentcpu.hardware.cpu_features import detect_cpu


def usable_cpus() -> int:
    """Logical CPUs this process may run on (cgroup/taskset affinity, where known)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_threads() -> int:
    """One thread per physical core we may run on: SMT siblings share the FMA/AMX units,
    so a second thread per core adds contention, not FLOPs."""
    return max(1, min(detect_cpu().physical_cores, usable_cpus()))


def configure_threads(n: int | None = None) -> int:
    """Set torch's intra-op thread count (None: `default_threads()`) and return it."""
    if n is None:
        n = default_threads()
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidRequestError(f"thread count must be an integer >= 1, got {n!r}")
    torch.set_num_threads(n)
    return torch.get_num_threads()
