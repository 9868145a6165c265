"""Dense linear layer whose weight may be a fused stack of checkpoint tensors.

A fused projection (q/k/v -> qkv_proj, gate/up -> gate_up_proj) names its row ranges
("shards"); the loader copies each checkpoint tensor into its range. Quantization
replaces this module with one of the same call signature (see `quant/`).
"""

from __future__ import annotations

import functools
import threading

import torch
import torch.nn.functional as F
from torch import nn

from agentcpu.errors import ModelLoadError


class Linear(nn.Module):
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


@functools.cache
def native_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AMX / AVX-512 BF16, or Arm
    BF16). Without it PyTorch's bf16 GEMM falls back to a slow reference loop (measured
    on an AVX2-only EPYC: 1 GFLOPS at 8 rows vs 27 for fp32), while its bf16 GEMV (one
    row) still streams the weights at full bandwidth."""
    from agentcpu.hardware.cpu_features import detect_cpu

    cpu = detect_cpu()
    return cpu.amx_bf16 or cpu.avx512_bf16 or (cpu.arch == "aarch64" and cpu.bf16)


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias. bf16 weights with more than one row on a CPU without native
    bf16 GEMM are widened to fp32 for the product: the conversion costs one pass over
    the weights, the fp32 GEMM then runs at full speed."""
    if weight.dtype != torch.bfloat16 or x.shape[0] == 1 or native_bf16_matmul():
        return F.linear(x, weight, bias)
    wide_bias = None if bias is None else bias.float()
    return F.linear(x.float(), _widened(weight), wide_bias).to(x.dtype)


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
