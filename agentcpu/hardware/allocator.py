"""Keep freed activation memory in the process instead of handing it back to the OS.

PyTorch's CPU allocator is plain `posix_memalign`/`free`. glibc serves blocks above its
mmap threshold (128 KiB at start, moving up to 32 MiB) with fresh `mmap`s and trims
the heap top above its trim threshold, so a prefill step's large activations (a
512-token chunk's gate/up output is 10 MB) come back as new pages every layer, and the
kernel zeroes each page on first touch: `clear_page_erms` plus page faults were ~4 % of a
512-token bf16 prefill step on the AMX VM (perf, 2026-12-06). Raising both thresholds
once, before the first step, makes those blocks reusable heap memory. Bounded: the
heap keeps at most what one step's peak needed, which the KV budget does not count and
which is small next to the weights.

`gc.freeze()` after the model is loaded moves the objects alive then (modules,
parameters, tokenizer tables) out of the collector's generations, so the full
collections that the engine's per-step Python objects trigger do not walk them again
(`gc_collect_main` and its visitors were ~2 % of the same profile).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import sys

M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc's ceiling for the dynamic threshold
TRIM_THRESHOLD_BYTES = 512 * 2**20


@functools.cache
def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds (once per process); False where the C
    library is not glibc or refuses."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    return mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and ok


def freeze_loaded_objects() -> None:
    """Collect once, then move every object alive now out of the collector's reach."""
    gc.collect()
    gc.freeze()
