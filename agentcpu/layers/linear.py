"""Dense linear layer whose weight may be a fused stack of checkpoint tensors.

A fused projection (q/k/v -> qkv_proj, gate/up -> gate_up_proj) names its row ranges
("shards"); the loader copies each checkpoint tensor into its range. Quantization
replaces this module with one of the same call signature (see `quant/`).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from agentcpu.errors import ModelLoadError
from agentcpu.hardware.cpu_features import detect_cpu
from agentcpu.hardware.native_build import kernel_addresses, native_bf16_matmul
from agentcpu.layers.amx_kernel import amx_kernel, amx_shape_ok
from agentcpu.layers.bf16_kernel import bf16_dot_kernel, bf16_kernel
from agentcpu.layers.fast_module import FastModule

# Largest batch a decode stack is asked to serve (`LinearOp.max_rows` is capped here).
DECODE_STACK_ROWS = 256


@dataclass(frozen=True)
class LinearOp:
    """A linear layer's compiled op for decode-sized batches, for the decode stack
    (`models/decode_stack.py`) to call natively: the op at `address` takes
    (x, *weights, bias) and is what the layer's `forward` runs for 1..`max_rows` rows."""

    address: int
    weights: tuple[torch.Tensor, ...]
    bias: torch.Tensor | None
    max_rows: int


def linear_op(
    module: ModuleType,
    name: str,
    weights: tuple[torch.Tensor, ...],
    bias: torch.Tensor | None,
    serves: Callable[[int], bool],
) -> LinearOp | None:
    """`LinearOp` for extension `module`'s op `name`, serving the batch sizes from 1 for
    which `serves(rows)` holds (None if not even 1)."""
    rows = 0
    while rows < DECODE_STACK_ROWS and serves(rows + 1):
        rows += 1
    if rows == 0:
        return None
    return LinearOp(kernel_addresses(module)[name], weights, bias, rows)


class Linear(FastModule):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype,
        shards: dict[str, int] | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), False) if bias else None
        self.shard_rows: dict[str, tuple[int, int]] = {}
        start = 0
        for name, rows in (shards or {}).items():
            self.shard_rows[name] = (start, rows)
            start += rows
        if shards and start != out_features:
            raise ValueError(f"shards cover {start} rows, layer has {out_features}")

    def load(self, param_name: str, tensor: torch.Tensor, shard: str | None, source: str) -> None:
        """Copy a checkpoint tensor into this layer's `weight`/`bias` (or one shard of it)."""
        param = getattr(self, param_name)
        if param is None:
            raise ModelLoadError(f"{source}: this model has no {param_name} for that layer")
        target = param.data
        if shard is not None:
            start, rows = self.shard_rows[shard]
            target = target.narrow(0, start, rows)
        copy_checked(target, tensor, source)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense_linear(x, self.weight, self.bias)

    def decode_op(self, dtype: torch.dtype) -> LinearOp | None:
        """The compiled op `forward` runs for small batches of `dtype`, if any."""
        kernel = dense_kernel(1, dtype, self.weight)
        if kernel is None:
            return None
        return linear_op(
            *kernel,
            (self.weight,),
            self.bias,
            lambda rows: dense_kernel(rows, dtype, self.weight) == kernel,
        )


# Up to this many rows the compiled small-batch kernel beats widening the weight to
# fp32 for one MKL GEMM (batched decode; measured at 64 streams: 88 vs 64 tok/s with the
# cap at 32); prefill chunks take the widening path.
SMALL_BATCH_MAX_ROWS = 64

# Up to this many rows a bf16 product on an AVX-512 BF16 CPU goes to the VDPBF16PS
# kernel: 2-3x oneDNN at 1-8 rows, 1.1-1.6x at 12-64, even at 128-256 (Zen 4, 2 threads,
# docs/kernels.md). On AMX CPUs only the bandwidth-bound products of up to
# `DOT_MAX_ROWS_AMX` rows go there (there oneDNN multiplies on tiles; not measured).
DOT_MAX_ROWS = 128
DOT_MAX_ROWS_AMX = 4

# Up to this many rows a bf16 product on an AMX CPU goes to our tile kernel when
# `AGENTCPU_AMX_LINEAR=1` (amx_kernel.py): it reads the weight in place where oneDNN
# repacks it per call.
AMX_MAX_ROWS = 128


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias. Where the CPU multiplies bf16 natively, decode-sized bf16
    products go to our kernels (`dense_kernel`), the rest to PyTorch's oneDNN
    GEMM. Where it does not, a bf16 product of up to `SMALL_BATCH_MAX_ROWS` rows goes to
    the compiled AVX2 small-batch kernel (weights read once with software prefetch, fp32
    FMAs; `csrc/bf16_linear.cpp`) — at one row too, where it decodes ~20 % faster than
    PyTorch's bf16 GEMV (docs/kernels.md) — and bigger batches widen the weight to fp32:
    the conversion costs one pass over the weights, the fp32 GEMM then runs at full
    speed."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if weight.dtype != torch.bfloat16 or rows == 0:
        return F.linear(x, weight, bias)
    if (kernel := dense_kernel(rows, x.dtype, weight)) is not None:
        module, name = kernel
        return getattr(module, name)(x, weight, bias)
    if native_bf16_matmul():
        return F.linear(x, weight, bias)
    wide_bias = None if bias is None else bias.float()
    return F.linear(x.float(), _widened(weight), wide_bias).to(x.dtype)


def dense_kernel(
    rows: int, dtype: torch.dtype, weight: torch.Tensor
) -> tuple[ModuleType, str] | None:
    """(extension, op name) of our kernel for a bf16-weight product of `rows` rows of
    `dtype`, or None where PyTorch runs it. On a CPU with native bf16 matmul: the AMX
    tile kernel where enabled and the weight tiles, else the VDPBF16PS kernel up to its
    row cap, for bf16 activations. Elsewhere the AVX2 small-batch kernel up to
    `SMALL_BATCH_MAX_ROWS`. The decode stack (`decode_stack.py`) asks too."""
    if weight.dtype != torch.bfloat16:
        return None
    if not native_bf16_matmul():
        if rows <= SMALL_BATCH_MAX_ROWS and (small := bf16_kernel()) is not None:
            return small, "bf16_linear_small_batch"
        return None
    if dtype != torch.bfloat16:
        return None
    if rows <= AMX_MAX_ROWS and amx_shape_ok(weight.shape) and (amx := amx_kernel()) is not None:
        return amx, "amx_bf16_linear"
    if rows <= dot_max_rows() and (dot := bf16_dot_kernel()) is not None:
        return dot, "bf16_dot_linear"
    return None


@functools.cache
def dot_max_rows() -> int:
    """The VDPBF16PS kernel's row cap on this CPU (reading the CPU's flags costs ~80 us,
    more than a decode-sized product)."""
    return DOT_MAX_ROWS_AMX if detect_cpu().amx_bf16 else DOT_MAX_ROWS


class _WideningScratch(threading.local):
    """One fp32 buffer per thread, grown to the largest weight seen and reused, so
    widening does not map fresh pages (page faults cost as much as the copy)."""

    buffer: torch.Tensor | None = None


_SCRATCH = _WideningScratch()  # the module's one piece of state: a per-thread scratch


def _widened(weight: torch.Tensor) -> torch.Tensor:
    n = weight.numel()
    if _SCRATCH.buffer is None or _SCRATCH.buffer.numel() < n:
        _SCRATCH.buffer = torch.empty(n, dtype=torch.float32)
    wide = _SCRATCH.buffer[:n].view(weight.shape)
    wide.copy_(weight)
    return wide


def copy_checked(target: torch.Tensor, tensor: torch.Tensor, source: str) -> None:
    """Copy with a shape check whose error names the checkpoint tensor."""
    if tuple(target.shape) != tuple(tensor.shape):
        raise ModelLoadError(
            f"tensor {source!r} has shape {tuple(tensor.shape)}, "
            f"the model expects {tuple(target.shape)}"
        )
    target.copy_(tensor)
