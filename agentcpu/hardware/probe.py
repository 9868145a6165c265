"""Measure this machine's limits with the ops we actually run: read bandwidth and matmul
FLOP/s, through torch (so oneDNN/AMX where torch uses them) on torch's configured threads.

Every figure is the best of a few runs: a roofline is an upper bound, and on a shared VM
the slow runs measure the neighbours, not the hardware.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from agentcpu.errors import AgentCPUError, InvalidRequestError
from agentcpu.hardware import huge_pages

DEFAULT_READ_BYTES = 1 << 30  # far larger than any LLC, so the sum streams from DRAM
DEFAULT_READ_REPEATS = 5
# fp32 sum is vectorised on every torch CPU build; bf16/int8 reductions go through
# conversion paths (int8 sum promotes to int64 and runs ~100x below DRAM speed).
READ_DTYPE = torch.float32

MATMUL_DTYPES = (torch.bfloat16, torch.float32, torch.int8)
DEFAULT_MATMUL_BUDGET_S = 2.0
MIN_MATMUL_N = 256
MAX_MATMUL_N = 4096
MIN_TIMED_RUNS = 3
MAX_TIMED_RUNS = 1000  # a cap only; the time budget ends the loop long before
INT_MM_ALIGNMENT = 8  # torch._int_mm wants k and n multiples of 8


class ProbeUnsupportedError(AgentCPUError):
    """This torch build cannot run the requested probe on this CPU (e.g. no int8 matmul)."""


def _best_seconds(fn: Callable[[], object], repeats: int, budget_s: float) -> float:
    """Fastest of up to `repeats` timed calls, stopping early once `budget_s` is spent."""
    best = float("inf")
    started = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - started > budget_s:
            break
    return best


def measure_read_bandwidth(
    bytes: int = DEFAULT_READ_BYTES, repeats: int = DEFAULT_READ_REPEATS
) -> float:
    """DRAM read bandwidth in GB/s (1e9 bytes/s): best of `repeats` sums over a buffer of
    `bytes` bytes (in huge pages where the weights are), after one warm-up pass."""
    if bytes < 1 << 20 or repeats < 1:
        raise InvalidRequestError(
            f"need bytes >= 1 MiB and repeats >= 1, got bytes={bytes}, repeats={repeats}"
        )
    element = torch.empty((), dtype=READ_DTYPE).element_size()
    # in huge pages like the weights (huge_pages.py), or the bound would sit below them
    buffer = huge_pages.zeros((bytes // element,), READ_DTYPE).fill_(1)
    buffer.sum()
    seconds = _best_seconds(buffer.sum, repeats, budget_s=float("inf"))
    return buffer.numel() * element / seconds / 1e9


def _random_matrix(dtype: torch.dtype, n: int, generator: torch.Generator) -> torch.Tensor:
    if dtype == torch.int8:
        return torch.randint(-64, 64, (n, n), dtype=torch.int8, generator=generator)
    return torch.randn(n, n, generator=generator).to(dtype)


def _operands(dtype: torch.dtype, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return _random_matrix(dtype, n, generator), _random_matrix(dtype, n, generator)


def _matmul_for(dtype: torch.dtype) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if dtype != torch.int8:
        return torch.matmul
    int_mm = getattr(torch, "_int_mm", None)
    if int_mm is None:
        raise ProbeUnsupportedError("this torch has no torch._int_mm (int8 matmul)")
    return int_mm


def _run_once(dtype: torch.dtype, n: int) -> float:
    matmul = _matmul_for(dtype)
    a, b = _operands(dtype, n)
    t0 = time.perf_counter()
    try:
        matmul(a, b)
    except (RuntimeError, NotImplementedError) as exc:
        raise ProbeUnsupportedError(f"{dtype} matmul failed on this CPU: {exc}") from exc
    return time.perf_counter() - t0


def _pick_size(dtype: torch.dtype, budget_s: float) -> int:
    """Largest power-of-two n (within bounds) whose matmul fits the budget a few times.

    A fixed size would not do: the same n runs in ms with AMX and in minutes on a CPU
    without native bf16 (an AVX2-only VM here ran bf16 matmul ~80x slower than fp32).
    Cost grows 8x per doubling of n.
    """
    per_run_s = budget_s / (MIN_TIMED_RUNS + 1)
    n = MIN_MATMUL_N
    while n < MAX_MATMUL_N and _run_once(dtype, n) * 8 < per_run_s:
        n *= 2
    return n


def _check_matmul_args(dtype: torch.dtype, n: int | None, budget_s: float) -> None:
    if dtype not in MATMUL_DTYPES:
        raise InvalidRequestError(f"dtype must be one of {MATMUL_DTYPES}, got {dtype}")
    if n is not None and (n < INT_MM_ALIGNMENT * 2 or n % INT_MM_ALIGNMENT):
        raise InvalidRequestError(f"n must be a multiple of {INT_MM_ALIGNMENT} >= 16, got {n}")
    if budget_s <= 0:
        raise InvalidRequestError(f"budget_s must be > 0, got {budget_s}")


def measure_matmul_flops(
    dtype: torch.dtype, n: int | None = None, budget_s: float = DEFAULT_MATMUL_BUDGET_S
) -> float:
    """Square n x n matmul throughput in FLOP/s (int8: integer ops/s), 2*n^3 per matmul.

    bf16 and fp32 use `torch.matmul` (oneDNN: AMX / AVX-512 BF16 where present); int8
    uses `torch._int_mm` and raises `ProbeUnsupportedError` where it is missing or fails.
    n=None picks the size from `budget_s` (see `_pick_size`); timed runs stop once
    `budget_s` is spent, after at least one.
    """
    _check_matmul_args(dtype, n, budget_s)
    size = n if n is not None else _pick_size(dtype, budget_s)
    _run_once(dtype, size)  # warm-up: oneDNN builds its primitive on the first call
    matmul = _matmul_for(dtype)
    a, b = _operands(dtype, size)
    seconds = _best_seconds(lambda: matmul(a, b), MAX_TIMED_RUNS, budget_s)
    return 2 * size**3 / seconds
