"""Weights and the KV pool in transparent huge pages (2 MiB), where Linux offers them.

A decode step streams every weight once: 0.35 GB a token for Qwen2.5-0.5B in int4, 1 GB
in bf16. On 4 KiB pages that is ~85,000-250,000 pages a step, far past any TLB, and the
hardware prefetchers stop at each 4 KiB boundary; on 2 MiB pages it is a few hundred.
Measured on the Zen 3 VM (2 threads; two engines on one checkpoint, with and without,
alternating rounds in one process: `benchmarks/huge_pages.py`, 2026-12-07), median of 7
per-round ratios at 1 stream: Qwen2.5-0.5B shape int4-g32-sym 1.049, int8 1.025, bf16
1.022; Llama-3.2-1B shape int4-g32-sym 1.017, bf16 1.001. At 16 streams (compute-bound
here) 0.999-1.006. A torch sum over 1 GiB read 1-9 % faster in the same runs.

Linux gives anonymous memory huge pages in two modes
(/sys/kernel/mm/transparent_hugepage/enabled): `always`, or `madvise` (the default of
many distributions), where only mappings that ask with `madvise(MADV_HUGEPAGE)` get them.
PyTorch's CPU allocator never asks. So, after loading, `move_to_huge_pages(model)`
copies every tensor the model holds into one private anonymous mapping, 2 MiB-aligned,
that asks, and re-points the tensors at it in place (`Tensor.set_`: every holder of the
tensor sees the new memory); the KV pool is allocated the same way (`zeros`). The
mapping lives as long as any tensor in it (torch.frombuffer keeps the mmap object).

Under `never`, off Linux, or with `AGENTCPU_HUGE_PAGES=0`, nothing moves and `zeros` is
`torch.zeros`. The hint is a request: under memory fragmentation the kernel may give
4 KiB pages for part of a mapping, which is only slower. The bandwidth probe reads a
buffer allocated here too, so the roofline stays an upper bound of what the kernels can
reach (probe.py).
"""

from __future__ import annotations

import functools
import logging
import math
import mmap
import os
import sys
import threading
import weakref
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

HUGE_PAGE_BYTES = 2 << 20
TENSOR_ALIGNMENT = 64  # what PyTorch's allocator gives; our kernels' vector loads assume no more
DISABLE_ENV = "AGENTCPU_HUGE_PAGES"
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")

# [start, end) of every live mapping made here: storages inside one need no move
_mappings: dict[int, int] = {}
_mappings_lock = threading.Lock()


@functools.cache
def thp_mode() -> str:
    """The kernel's transparent-huge-page mode: always, madvise, never, or unavailable."""
    try:
        text = THP_SETTING.read_text()
    except OSError:
        return "unavailable"
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else "unavailable"


def enabled() -> bool:
    """Whether allocations here ask for huge pages (Linux, THP always/madvise, not
    disabled by `AGENTCPU_HUGE_PAGES=0`)."""
    if os.environ.get(DISABLE_ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    return hasattr(mmap, "MADV_HUGEPAGE") and thp_mode() in ("always", "madvise")


def zeroed_bytes(nbytes: int) -> torch.Tensor:
    """A zero-filled uint8 tensor of `nbytes`, in huge pages where `enabled()`.

    Anonymous pages read as zero and are mapped on first write, as calloc's are."""
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    if not enabled() or nbytes == 0:
        return torch.zeros(nbytes, dtype=torch.uint8)
    span = math.ceil(nbytes / HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    try:
        mapping = mmap.mmap(-1, span + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError:  # no address space left for the padded mapping: PyTorch's allocator
        return torch.zeros(nbytes, dtype=torch.uint8)  # decides (and names the shortage)
    whole = torch.frombuffer(mapping, dtype=torch.uint8)  # holds the mapping alive
    start = -whole.data_ptr() % HUGE_PAGE_BYTES
    try:
        mapping.madvise(mmap.MADV_HUGEPAGE, start, span)
    except OSError:  # a kernel that refuses the hint still gives memory: 4 KiB pages
        log.debug("madvise(MADV_HUGEPAGE) refused; %d bytes stay in 4 KiB pages", nbytes)
    base = whole.data_ptr()
    with _mappings_lock:
        _mappings[base] = base + len(mapping)
    weakref.finalize(mapping, _forget, base)
    return whole[start : start + nbytes]


def _forget(base: int) -> None:
    with _mappings_lock:
        _mappings.pop(base, None)


def in_huge_pages(tensor: torch.Tensor) -> bool:
    """Whether `tensor`'s storage lies in a mapping made here (`zeroed_bytes`)."""
    storage = tensor.untyped_storage()
    start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    with _mappings_lock:
        return any(base <= start and end <= stop for base, stop in _mappings.items())


def zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """`torch.zeros(shape, dtype=dtype)`, in huge pages where `enabled()`."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return zeroed_bytes(math.prod(shape) * itemsize).view(dtype).view(shape)


def weight_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed tensor for a weight the model keeps (a packed layout made at load):
    its own huge-page mapping from one huge page up, so `move_to_huge_pages` need not
    copy it again; smaller ones from PyTorch's allocator (a mapping each would round
    them up to 2 MiB), which the move then gathers into its arena."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    if math.prod(shape) * itemsize < HUGE_PAGE_BYTES:
        return torch.zeros(shape, dtype=dtype)
    return zeros(shape, dtype)


def place_large_parameters(module: nn.Module) -> int:
    """Give every parameter of one huge page or more its own huge-page mapping, before
    the checkpoint is copied in (the storage `to_empty` made is dropped untouched, so no
    page of it was ever faulted in). The copy then faults 2 MiB pages once, packing can
    work in place (`packed_linear.pack_weight(in_place=True)`) and `move_to_huge_pages`
    skips them: on the Zen 3 VM a page fault costs enough that faulting a bf16 1B model's
    weights twice (4 KiB pages, then the packed buffer) was half of its load. Returns
    how many parameters moved; 0 where not `enabled()`."""
    if not enabled():
        return 0
    moved = 0
    for param in module.parameters():  # each shared parameter once; ties keep the object
        if param.device.type == "cpu" and param.nbytes >= HUGE_PAGE_BYTES and not in_huge_pages(param):
            param.data = weight_buffer(tuple(param.shape), param.dtype)
            moved += 1
    return moved


def module_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Every tensor `module` and its submodules hold: parameters, buffers and plain
    tensor attributes (kernels' packed weights are kept as attributes)."""
    found: list[torch.Tensor] = []
    for sub in module.modules():
        values = [*sub._parameters.values(), *sub._buffers.values(), *vars(sub).values()]
        found.extend(v for v in values if isinstance(v, torch.Tensor))
    return found


def move_to_huge_pages(module: nn.Module) -> int:
    """Copy the storage of every tensor `module` holds into one huge-page mapping and
    re-point the tensors there (in place, views and tied weights kept), except those
    already in one (`in_huge_pages`); returns the bytes moved, 0 where not `enabled()`. Call it before the first forward: a kernel
    that cached a weight's address would keep reading the old copy."""
    if not enabled():
        return 0
    storages: dict[int, tuple[torch.UntypedStorage, list[torch.Tensor]]] = {}
    for tensor in module_tensors(module):
        storage = tensor.untyped_storage()
        if storage.nbytes() == 0 or storage.device.type != "cpu" or in_huge_pages(tensor):
            continue
        entry = storages.setdefault(storage.data_ptr(), (storage, []))
        if all(tensor is not seen for seen in entry[1]):
            entry[1].append(tensor)
    groups = list(storages.values())
    storages.clear()
    offsets, total = [], 0
    for storage, _ in groups:
        offsets.append(total)
        total += math.ceil(storage.nbytes() / TENSOR_ALIGNMENT) * TENSOR_ALIGNMENT
    if total == 0:
        return 0
    arena = zeroed_bytes(total)
    arena_storage, base = arena.untyped_storage(), arena.storage_offset()
    moved = 0
    with torch.no_grad():
        for i, offset in enumerate(offsets):
            storage, tensors = groups[i]
            groups[i] = None  # drop our reference: the old copy goes once its tensors move
            nbytes = storage.nbytes()
            arena[offset : offset + nbytes].copy_(torch.empty(0, dtype=torch.uint8).set_(storage))
            for tensor in tensors:
                start = (base + offset) // tensor.element_size() + tensor.storage_offset()
                tensor.set_(arena_storage, start, tensor.size(), tensor.stride())
            moved += nbytes
            del storage, tensors
    return moved
