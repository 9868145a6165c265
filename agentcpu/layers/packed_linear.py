"""bf16 linear layers repacked once at load for the packed kernel.

`pack_linears(model)` swaps every bf16 `Linear` whose shape packs (out_features a
multiple of 16, in_features even) for a `PackedLinear` holding the same weight in
VDPBF16PS operand order, [N / 16, K / 2, 16, 2] (`csrc/bf16_packed_linear.cpp`): one
copy of the weights, as before, in the layout the kernel streams. On AVX-512 BF16 CPUs
the kernel multiplies the pairs with VDPBF16PS; on AVX2 + FMA CPUs it widens each line
to fp32 in registers (two integer ops per 8 pairs). Measured against the alternatives
on each machine (docs/kernels.md): on a Zen 4 (AVX-512 BF16) it beat oneDNN and the
in-place kernel at every batch size from 1 to 512 rows; on a Zen 3 (AVX2) it beat the
in-place AVX2 kernel at 1-64 rows and widening to fp32 for MKL at 512. Where neither
instruction set is present (or the kernel cannot be built) nothing is swapped. Runs
after quantization, so only float layers that stayed bf16 are packed; `weight` unpacks
on demand for code that wants the [N, K] matrix (quantizing a packed model, tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from agentcpu.hardware import huge_pages
from agentcpu.layers.bf16_kernel import bf16_packed_kernel
from agentcpu.layers.fast_module import FastModule
from agentcpu.layers.linear import Linear, LinearOp, linear_op

BLOCK_ROWS = 16  # output rows per packed block (one 16-lane fp32 vector)


def pack_weight(weight: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """[N, K] -> [N / 16, K / 2, 16, 2]: block b, k pair p holds rows 16 b .. 16 b + 15.

    `in_place` (the loader, which owns the weight): a bf16 weight already in huge pages
    is packed in its own memory (a block keeps its rows' bytes) and the weight's
    contents are gone; otherwise, or without the kernel, into a new buffer."""
    n, k = weight.shape
    shape = (n // BLOCK_ROWS, k // 2, BLOCK_ROWS, 2)
    kernel = bf16_packed_kernel()
    fast = kernel is not None and weight.dtype == torch.bfloat16 and weight.is_contiguous()
    if fast and in_place and huge_pages.in_huge_pages(weight):
        kernel.bf16_pack_weight(weight, weight)  # no fresh pages to fault in
        return weight.view(shape)
    packed = huge_pages.weight_buffer(shape, weight.dtype)  # in huge pages where it pays
    if fast:
        kernel.bf16_pack_weight(weight, packed)  # register transposes, ~2.5x the copy below
    elif weight.dtype.itemsize == 2 and weight.is_contiguous():
        # each k pair as one int32: a batched 2-D transpose, ~1.5x the 4-D permute's copy
        # rate (at load, ~1 GB/s -> ~1.7 GB/s)
        pairs = weight.view(torch.int32).view(n // BLOCK_ROWS, BLOCK_ROWS, k // 2)
        packed.view(torch.int32).view(shape[:3]).copy_(pairs.transpose(1, 2))
    else:
        packed.copy_(weight.view(n // BLOCK_ROWS, BLOCK_ROWS, k // 2, 2).permute(0, 2, 1, 3))
    return packed


def unpack_weight(packed: torch.Tensor) -> torch.Tensor:
    blocks, pairs = packed.shape[:2]
    return packed.permute(0, 2, 1, 3).reshape(blocks * BLOCK_ROWS, pairs * 2)


def packable(layer: nn.Module) -> bool:
    if not isinstance(layer, Linear) or layer.weight.dtype != torch.bfloat16:
        return False
    return layer.out_features % BLOCK_ROWS == 0 and layer.in_features % 2 == 0


class PackedLinear(FastModule):
    """A bf16 `Linear` in packed layout: same `forward(x)`, `in_features`,
    `out_features`, `bias`."""

    def __init__(self, packed: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        blocks, pairs = packed.shape[:2]
        self.in_features, self.out_features = pairs * 2, blocks * BLOCK_ROWS
        self.register_buffer("packed", packed)
        self.register_buffer("bias", bias)
        self.kernel = bf16_packed_kernel()

    @classmethod
    def from_linear(cls, layer: Linear, take: bool = False) -> PackedLinear:
        """`take`: pack the weight in its own memory where it can (`pack_weight`'s
        `in_place`); the layer must not be used afterwards (the loader's swap)."""
        bias = None if layer.bias is None else layer.bias.data
        return cls(pack_weight(layer.weight.data, in_place=take), bias)

    @property
    def weight(self) -> torch.Tensor:
        """The [out, in] weight, unpacked (a copy: writing to it changes nothing)."""
        return unpack_weight(self.packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and self.kernel is not None:
            return self.kernel.bf16_packed_linear(x, self.packed, self.bias)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)

    def decode_op(self, dtype: torch.dtype) -> LinearOp | None:
        """The packed kernel, which `forward` runs for bf16 batches of every size."""
        if dtype != torch.bfloat16 or self.kernel is None:
            return None
        return linear_op(
            self.kernel, "bf16_packed_linear", (self.packed,), self.bias, lambda rows: True
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class PackedEmbedding(nn.Module):
    """The token embedding of a tied model, read from the packed LM head: one table
    serves the row lookup (a gather of one row's k pairs, 64 bytes apart) and the head's
    kernel."""

    def __init__(self, packed: torch.Tensor):
        super().__init__()
        self.register_buffer("packed", packed)

    @property
    def weight(self) -> torch.Tensor:
        """The [vocab, hidden] table, unpacked (a copy)."""
        return unpack_weight(self.packed)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.packed[ids // BLOCK_ROWS, :, ids % BLOCK_ROWS, :]  # [..., K/2, 2]
        return rows.reshape(*ids.shape, -1)


def pack_linears(model: nn.Module) -> int:
    """Swap every packable `Linear` in `model` (in place), and a tied LM head; returns
    how many layers were packed."""
    if bf16_packed_kernel() is None:
        return 0
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if packable(child)
    ]
    for parent, name, child in swaps:  # one at a time: each plain weight is freed as we go
        setattr(parent, name, PackedLinear.from_linear(child, take=True))
    return len(swaps) + _pack_tied_head(model)


def _pack_tied_head(model: nn.Module) -> int:
    """A tied model computes logits with its embedding table (`lm_head is None`): at 32
    streams that product is ~28 % of a Qwen2.5-0.5B decode step, and on the in-place
    kernel it ran at ~300 GFLOPS against the packed kernel's ~370. The table is packed
    once and shared: `lm_head` becomes a `PackedLinear` over it and the embedding a
    `PackedEmbedding` over the same tensor (no second copy)."""
    if getattr(model, "lm_head", False) is not None or not hasattr(model, "model"):
        return 0
    table = model.model.embed_tokens.weight
    vocab, hidden = table.shape
    if table.dtype != torch.bfloat16 or vocab % BLOCK_ROWS or hidden % 2:
        return 0
    packed = pack_weight(table.data, in_place=True)  # both modules below replace its users
    model.model.embed_tokens = PackedEmbedding(packed)
    model.lm_head = PackedLinear(packed, None)
    return 1
