"""RMSNorm, computed in fp32 and cast back, as the Hugging Face reference does (one
compiled op where `fused_ops` is built)."""

import torch
from torch import nn

from agentcpu.layers.fast_module import FastModule
from agentcpu.layers.fused_ops import fused_for


class RMSNorm(FastModule):
    def __init__(self, size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype and (ops := fused_for(x)) is not None:
            return ops.rms_norm(x, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def add_forward(
        self, residual: torch.Tensor, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual + x, this norm of it): the decoder's residual add and the norm after
        it, one compiled op where it is built (the sum rounded to the dtype first, as the
        unfused add is)."""
        if x.dtype == self.weight.dtype == residual.dtype and (ops := fused_for(x)) is not None:
            return ops.add_rms_norm(residual, x, self.weight, self.eps)
        total = residual + x
        return total, self.forward(total)
