"""Dense linear layer whose weight may be a fused stack of checkpoint tensors.

A fused projection (q/k/v -> qkv_proj, gate/up -> gate_up_proj) names its row ranges
("shards"); the loader copies each checkpoint tensor into its range. Quantization
replaces this module with one of the same call signature (see `quant/`).
"""

from __future__ import annotations

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
        return F.linear(x, self.weight, self.bias)


def copy_checked(target: torch.Tensor, tensor: torch.Tensor, source: str) -> None:
    """Copy with a shape check whose error names the checkpoint tensor."""
    if tuple(target.shape) != tuple(tensor.shape):
        raise ModelLoadError(
            f"tensor {source!r} has shape {tuple(tensor.shape)}, "
            f"the model expects {tuple(target.shape)}"
        )
    target.copy_(tensor)
