"""Freed activation memory stays in the process (no fresh zeroed pages every step)."""

import resource
import sys

import pytest
import torch

from agentcpu.hardware.allocator import keep_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_a_freed_large_tensor_is_reused_without_page_faults():
    assert keep_freed_memory()

    def touch_and_free():
        t = torch.empty(10 * 2**20, dtype=torch.uint8)  # a 512-token gate/up output's size
        t.fill_(1)
        del t

    # glibc settles within a few cycles (how many depends on the heap earlier tests
    # left: 1-3 here); a heap that never stops faulting fails below
    for _ in range(10):
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        touch_and_free()
        if resource.getrusage(resource.RUSAGE_SELF).ru_minflt == start:
            break
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        touch_and_free()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    # a fresh mmap would fault in all 2,560 pages of each of the 20 blocks (51,200);
    # glibc still regrows its heap now and then (one block's 2,560 faults in some runs,
    # depending on what earlier tests left), so the bound allows a few such cycles
    assert faults < 4 * 2560, faults
