"""Quantized replacements for `layers.linear.Linear`: same `forward(x)` signature, same
`in_features` / `out_features` / `bias`, weights held in the formats of `formats.py`."""

from __future__ import annotations

import dataclasses

import torch

from agentcpu.layers.fast_module import FastModule
from agentcpu.layers.linear import LinearOp, linear_op
from agentcpu.quant import formats, ops


class QuantizedLinear(FastModule):
    """Common part: shape attributes and an optional bias (kept in the model dtype)."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise formats.QuantizationError(
                f"bias has shape {tuple(bias.shape)}, expected ({out_features},)"
            )
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    @property
    def weight_data(self) -> formats.Int8Weight | formats.Int4Weight:
        raise NotImplementedError

    def _relaid_by(self) -> str | None:
        """The method that stored the weight in a kernel's layout, None while in rows."""
        return None

    def load_rows(self, start: int, weight: formats.Int8Weight | formats.Int4Weight) -> None:
        """Copy `weight` into output rows start.. (one part of a fused projection, as a
        GGUF loader fills a module made by `empty`); its format must match ours, and the
        module must still be in rows (`weight_data` of a relaid one is a copy)."""
        if (method := self._relaid_by()) is not None:
            raise formats.QuantizationError(f"load rows before {method}(), not after")
        ours = self.weight_data
        for field in dataclasses.fields(ours):
            target, part = getattr(ours, field.name), getattr(weight, field.name)
            _check_rows(target, part, start, field.name)
            if part.dtype != target.dtype:
                raise formats.QuantizationError(
                    f"{field.name}: expected {target.dtype}, got {part.dtype}"
                )
            target.narrow(0, start, part.shape[0]).copy_(part)

    def load_bias_rows(self, start: int, bias: torch.Tensor) -> None:
        if self.bias is None:
            raise formats.QuantizationError("this layer has no bias")
        _check_rows(self.bias, bias, start, "bias")
        self.bias.narrow(0, start, bias.shape[0]).copy_(bias)


def _check_rows(target: torch.Tensor, part: torch.Tensor, start: int, what: str) -> None:
    fits = tuple(part.shape[1:]) == tuple(target.shape[1:]) and 0 <= start
    if not fits or start + part.shape[0] > target.shape[0]:
        raise formats.QuantizationError(
            f"{what} {tuple(part.shape)} does not fit rows {start}.. of {tuple(target.shape)}"
        )


class Int8Linear(QuantizedLinear):
    """int8 weight [out, in] with fp32 scales per output channel or per group."""

    def __init__(self, weight: formats.Int8Weight, bias: torch.Tensor | None = None):
        out_features, in_features = weight.qweight.shape  # rows (`lay_out_panels` after)
        super().__init__(in_features, out_features, bias)
        self.register_buffer("qweight", weight.qweight.contiguous())
        self.register_buffer("scales", weight.scales.float().contiguous())

    @classmethod
    def from_float(
        cls, weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int | None = None
    ) -> Int8Linear:
        """Quantize a float weight: per output channel (group_size None) or per group."""
        return cls(formats.quantize_int8(weight, group_size), bias)

    @classmethod
    def from_q8_0(
        cls, qs: torch.Tensor, d: torch.Tensor, bias: torch.Tensor | None = None
    ) -> Int8Linear:
        """From GGUF Q8_0 blocks split into `qs` int8 [out, in] and `d` fp16 [out, in // 32]."""
        return cls(formats.int8_from_q8_0(qs, d), bias)

    @classmethod
    def empty(
        cls, out_features: int, in_features: int, group_size: int, bias_dtype: torch.dtype | None
    ) -> Int8Linear:
        """Unfilled buffers (e.g. on the meta device) for `load_rows` to fill."""
        formats.check_group(in_features, group_size, None)
        qweight = torch.empty(out_features, in_features, dtype=torch.int8)
        scales = torch.empty(out_features, in_features // group_size)
        return cls(formats.Int8Weight(qweight, scales), _empty_bias(out_features, bias_dtype))

    @property
    def in_panels(self) -> bool:
        return formats.is_int8_panels(self.qweight)

    def _relaid_by(self) -> str | None:
        return "lay_out_panels" if self.in_panels else None

    def lay_out_panels(self) -> bool:
        """Store the weight in the int8 VNNI kernel's panels where this CPU takes that path
        and the layer allows it (`formats.fits_int8_panels`): from 4 rows 1.5-4x the GEMV
        and 1.6-1.8x a bf16 layer on Zen 4 (docs/quantization.md). Returns whether it did."""
        if self.in_panels or not ops.vnni_path() or not formats.fits_int8_panels(self.weight_data):
            return False
        self.qweight = formats.int8_panels(self.weight_data)
        return True

    @property
    def weight_data(self) -> formats.Int8Weight:
        """The weight in rows (a copy where it is stored in panels)."""
        if self.in_panels:
            return formats.Int8Weight(formats.int8_rows_from_panels(self.qweight), self.scales)
        return formats.Int8Weight(self.qweight, self.scales)

    def dequantized_weight(self) -> torch.Tensor:
        return formats.dequantize_int8(self.weight_data)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.int8_linear(x, self.qweight, self.scales, self.bias)

    def decode_op(self, dtype: torch.dtype) -> LinearOp | None:
        """The GEMV (or the VNNI kernel for a weight in panels), for the batch sizes
        `forward` sends to it."""
        if (k := ops.kernels()) is None:
            return None
        path = "vnni" if self.in_panels else "gemv"
        return linear_op(
            k,
            f"int8_linear_{path}",
            (self.qweight, self.scales),
            self.bias,
            lambda rows: ops.int8_path(rows, dtype, self.qweight, self.scales) == path,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.weight_data.group_size}"


class Int4Linear(QuantizedLinear):
    """Packed int4 weight [out, in // 2] with fp16 scales and offsets per group; after
    `interleave_rows()` the same bytes in the decode kernel's 8-row layout
    (`formats.interleave_int4`), which `weight_data` turns back into rows."""

    def __init__(self, weight: formats.Int4Weight, bias: torch.Tensor | None = None):
        super().__init__(weight.in_features, weight.qweight.shape[0], bias)
        self.register_buffer("qweight", weight.qweight.contiguous())
        self.register_buffer("scales", weight.scales.to(torch.float16).contiguous())
        self.register_buffer("offsets", weight.offsets.to(torch.float16).contiguous())

    @classmethod
    def from_float(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        group_size: int = 128,
        symmetric: bool = False,
    ) -> Int4Linear:
        return cls(formats.quantize_int4(weight, group_size, symmetric), bias)

    @classmethod
    def from_q4_0(
        cls, qs: torch.Tensor, d: torch.Tensor, bias: torch.Tensor | None = None
    ) -> Int4Linear:
        """From GGUF Q4_0 blocks split into `qs` uint8 [out, in // 2] (each block's 16
        bytes in file order) and `d` fp16 [out, in // 32]."""
        return cls(formats.int4_from_q4_0(qs, d), bias)

    @classmethod
    def empty(
        cls, out_features: int, in_features: int, group_size: int, bias_dtype: torch.dtype | None
    ) -> Int4Linear:
        """Unfilled buffers (e.g. on the meta device) for `load_rows` to fill."""
        formats.check_group(in_features, group_size, formats.INT4_GROUP_SIZES)
        groups = in_features // group_size
        weight = formats.Int4Weight(
            torch.empty(out_features, in_features // 2, dtype=torch.uint8),
            torch.empty(out_features, groups, dtype=torch.float16),
            torch.empty(out_features, groups, dtype=torch.float16),
        )
        return cls(weight, _empty_bias(out_features, bias_dtype))

    @property
    def interleaved(self) -> bool:
        return formats.is_interleaved_int4(self.qweight)

    def _relaid_by(self) -> str | None:
        return "interleave_rows" if self.interleaved else None

    def interleave_rows(self) -> bool:
        """Store the weight 8 rows interleaved, where the kernels read that layout and
        the shape allows (out_features a multiple of 8, in_features of 64): 1.1-1.8x the
        row layout's GEMV on AVX2 (docs/quantization.md). Returns whether it did."""
        if self.interleaved or ops.kernels() is None:
            return False
        if self.out_features % formats.INTERLEAVE_ROWS or self.in_features % ops.GEMV_INT4_ALIGN:
            return False
        self.qweight, self.scales, self.offsets = formats.interleave_int4(self.weight_data)
        return True

    @property
    def weight_data(self) -> formats.Int4Weight:
        """The weight in the row layout (a copy where it is stored interleaved)."""
        if self.interleaved:
            return formats.deinterleave_int4(self.qweight, self.scales, self.offsets)
        return formats.Int4Weight(self.qweight, self.scales, self.offsets)

    def dequantized_weight(self) -> torch.Tensor:
        return formats.dequantize_int4(self.weight_data)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.int4_linear(x, self.qweight, self.scales, self.offsets, self.bias)

    def decode_op(self, dtype: torch.dtype) -> LinearOp | None:
        """The GEMV, for the batch sizes `forward` sends to it."""
        if (k := ops.kernels()) is None:
            return None
        return linear_op(
            k,
            "int4_linear_gemv",
            (self.qweight, self.scales, self.offsets),
            self.bias,
            lambda rows: ops.int4_path(rows, dtype, self.qweight) == "gemv",
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.weight_data.group_size}"


def _empty_bias(out_features: int, dtype: torch.dtype | None) -> torch.Tensor | None:
    return None if dtype is None else torch.empty(out_features, dtype=dtype)
