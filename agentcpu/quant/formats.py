"""In-memory formats of quantized weights, and conversions to and from float.

int8 (`Int8Weight`): `qweight` int8 [N, K], `scales` fp32 [N, K // group] (group == K
means one scale per output channel); w = qweight * scales, symmetric, values in
[-127, 127] when made here (a GGUF Q8_0 block may hold -128, which is kept).

int4 (`Int4Weight`): `qweight` uint8 [N, K // 2], `scales` and `offsets` fp16
[N, K // group]; w = q * scale + offset with q in 0..15. Inside each block of 32 weights
(16 bytes) byte j holds weight j in its low nibble and weight j + 16 in its high nibble,
which is GGUF Q4_0's order, so Q4_0 data maps on with no float step
(offset = -8 * d). Symmetric quantization is the same format with offset = -8 * scale.

docs/quantization.md has the full description.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from agentcpu.errors import InvalidRequestError
from agentcpu.hardware import huge_pages

BLOCK = 32  # weights per Q4_0 / Q8_0 block, and the smallest group
INT4_GROUP_SIZES = (32, 64, 128)
INT8_MAX = 127
INT4_LEVELS = 15
Q4_0_ZERO = 8  # Q4_0 stores q + 8: w = (q - 8) * d
FP16_MAX = torch.finfo(torch.float16).max
NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SLAB_BYTES = 4 << 20  # fp32 bytes of one row slab while quantizing (`_row_slabs`)


class QuantizationError(InvalidRequestError):
    """A weight cannot be quantized as asked (shape not a multiple of the group, ...)."""


@dataclass(frozen=True)
class Int8Weight:
    qweight: torch.Tensor  # int8 [N, K]
    scales: torch.Tensor  # fp32 [N, K // group]

    @property
    def group_size(self) -> int:
        return self.qweight.shape[1] // self.scales.shape[1]


@dataclass(frozen=True)
class Int4Weight:
    qweight: torch.Tensor  # uint8 [N, K // 2], Q4_0 nibble order per 32-block
    scales: torch.Tensor  # fp16 [N, K // group]
    offsets: torch.Tensor  # fp16 [N, K // group]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1] * 2

    @property
    def group_size(self) -> int:
        return self.in_features // self.scales.shape[1]


def _check_2d(weight: torch.Tensor) -> None:
    if weight.dim() != 2 or not weight.is_floating_point():
        raise QuantizationError(
            f"expected a 2-D float weight, got {weight.dtype} {tuple(weight.shape)}"
        )


def check_group(in_features: int, group_size: int, allowed: tuple[int, ...] | None) -> None:
    if allowed is not None and group_size not in allowed:
        raise QuantizationError(f"group size must be one of {allowed}, got {group_size}")
    if group_size < 1 or in_features % group_size:
        raise QuantizationError(
            f"in_features {in_features} is not a multiple of the group size {group_size}; "
            f"use a group size that divides it (int4: one of {INT4_GROUP_SIZES})"
        )


def _row_slabs(out_features: int, in_features: int) -> tuple[range, int]:
    """Starts of the row slabs a weight is quantized in: each slab's fp32 temporaries stay
    under `SLAB_BYTES`, below glibc's mmap threshold, so they reuse heap memory instead
    of faulting in fresh zeroed pages per op (whole-matrix temporaries made loading a 1B
    model in int4 take ~20 s, most of it page faults)."""
    rows = max(1, SLAB_BYTES // (4 * max(1, in_features)))
    return range(0, out_features, rows), rows


def _native_quantizer(weight: torch.Tensor):
    """The compiled quantizers (`csrc/quantize.cpp`, the same bytes as the PyTorch code
    below, ~10x faster) for a CPU float weight, or None: then the PyTorch code runs."""
    if weight.device.type != "cpu" or weight.dtype not in NATIVE_DTYPES:
        return None
    from agentcpu.quant.kernels import kernels  # formats is imported by the kernels' users

    return kernels()


def quantize_int8(weight: torch.Tensor, group_size: int | None = None) -> Int8Weight:
    """Symmetric int8, one fp32 scale per output channel (group_size None) or per group."""
    _check_2d(weight)
    out_features, in_features = weight.shape
    group = group_size or in_features
    check_group(in_features, group, None)
    native = _native_quantizer(weight)
    if native is not None:
        return Int8Weight(*native.quantize_int8_native(weight.contiguous(), group))
    qweight = torch.empty(out_features, in_features, dtype=torch.int8)
    scales = torch.empty(out_features, in_features // group)
    starts, rows = _row_slabs(out_features, in_features)
    for r0 in starts:
        r1 = min(out_features, r0 + rows)
        w = weight[r0:r1].float().reshape(r1 - r0, in_features // group, group)
        s = w.abs().amax(dim=-1) / INT8_MAX
        inverse = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
        q = torch.round(w * inverse.unsqueeze(-1)).clamp_(-INT8_MAX, INT8_MAX)
        qweight[r0:r1] = q.reshape(r1 - r0, in_features)
        scales[r0:r1] = s
    return Int8Weight(qweight, scales)


def dequantize_int8(w: Int8Weight) -> torch.Tensor:
    out_features, in_features = w.qweight.shape
    q = w.qweight.float().reshape(out_features, w.scales.shape[1], -1)
    return (q * w.scales.unsqueeze(-1)).reshape(out_features, in_features)


def _fp16(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.abs().max() > FP16_MAX:
        raise QuantizationError(f"int4 {what} exceed the fp16 range (|value| > {FP16_MAX})")
    return t.to(torch.float16)


def _int4_params(w: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (scale, offset) per group of `w` [N, G, group]."""
    if symmetric:
        index = w.abs().argmax(dim=-1, keepdim=True)
        extreme = w.gather(-1, index).squeeze(-1)
        scales = _fp16(extreme / -Q4_0_ZERO, "scales")
        return scales, -Q4_0_ZERO * scales
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scales = _fp16((hi - lo) / INT4_LEVELS, "scales")
    return scales, _fp16(lo, "offsets")


def quantize_int4(
    weight: torch.Tensor, group_size: int = 128, symmetric: bool = False
) -> Int4Weight:
    """Group-wise int4. Asymmetric: q = round((w - min) / scale), scale = (max - min) / 15.
    Symmetric (llama.cpp Q4_0's rule): scale = -e / 8 where e is the weight of largest
    magnitude (so e lands exactly on level 0), q = round(w / scale) + 8 clamped to 0..15."""
    _check_2d(weight)
    out_features, in_features = weight.shape
    check_group(in_features, group_size, INT4_GROUP_SIZES)
    groups = in_features // group_size
    native = _native_quantizer(weight)
    if native is not None:
        qweight, scales, offsets, status = native.quantize_int4_native(
            weight.contiguous(), group_size, symmetric
        )
        for bit, what in ((1, "scales"), (2, "offsets")):
            if status & bit:
                raise QuantizationError(f"int4 {what} exceed the fp16 range (|value| > {FP16_MAX})")
        return Int4Weight(qweight, scales, offsets)
    qweight = torch.empty(out_features, in_features // 2, dtype=torch.uint8)
    scales = torch.empty(out_features, groups, dtype=torch.float16)
    offsets = torch.empty(out_features, groups, dtype=torch.float16)
    starts, rows = _row_slabs(out_features, in_features)
    for r0 in starts:
        r1 = min(out_features, r0 + rows)
        w = weight[r0:r1].float().reshape(r1 - r0, groups, group_size)
        scales[r0:r1], offsets[r0:r1] = _int4_params(w, symmetric)
        sc, m = scales[r0:r1].float().unsqueeze(-1), offsets[r0:r1].float().unsqueeze(-1)
        inverse = torch.where(sc != 0, 1.0 / sc, torch.zeros_like(sc))
        q = torch.round((w - m) * inverse).clamp_(0, INT4_LEVELS).to(torch.uint8)
        qweight[r0:r1] = pack_int4(q.reshape(r1 - r0, in_features))
    return Int4Weight(qweight, scales, offsets)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15 [N, K] -> [N, K // 2] in Q4_0 nibble order per 32-block."""
    out_features, in_features = q.shape
    if in_features % BLOCK:
        raise QuantizationError(f"int4 needs in_features a multiple of {BLOCK}, got {in_features}")
    blocks = q.reshape(out_features, in_features // BLOCK, 2, BLOCK // 2)
    packed = blocks[:, :, 0] | (blocks[:, :, 1] << 4)
    return packed.reshape(out_features, in_features // 2).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: [N, K // 2] -> uint8 values 0..15 [N, K]."""
    out_features, half = packed.shape
    blocks = packed.reshape(out_features, half * 2 // BLOCK, 1, BLOCK // 2)
    q = torch.cat([blocks & 0x0F, blocks >> 4], dim=2)
    return q.reshape(out_features, half * 2)


def dequantize_int4(w: Int4Weight) -> torch.Tensor:
    out_features, in_features = w.qweight.shape[0], w.in_features
    q = unpack_int4(w.qweight).float().reshape(out_features, w.scales.shape[1], -1)
    deq = q * w.scales.float().unsqueeze(-1) + w.offsets.float().unsqueeze(-1)
    return deq.reshape(out_features, in_features)


INTERLEAVE_ROWS = 8  # rows of an interleaved int4 group: one per 32-bit lane of a vector


def interleave_int4(w: Int4Weight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The decode kernel's layout of an int4 weight (docs/quantization.md, "interleaved"):
    rows in groups of 8, each 32-weight block of a group 128 bytes whose 32-byte vector p
    holds bytes 4p..4p+3 of the block of every row in turn (a byte permutation of Q4_0
    blocks, as llama.cpp's repack), so lane r of every vector is row r. Returns (qweight
    uint8 [N/8, K/32, 128], scales and offsets fp16 [N/8, K/group, 8]); N must be a
    multiple of 8. A symmetric weight (every offset -8 x its scale, as Q4_0 and
    `--quant int4-*-sym` make) keeps no offsets: [N/8, K/group, 0], the kernels derive
    them, and a decode step reads 4.5 bits a weight instead of 5 (Q4_0's size)."""
    rows, half = w.qweight.shape
    if rows % INTERLEAVE_ROWS:
        raise QuantizationError(f"interleaving needs out_features a multiple of 8, got {rows}")
    groups, blocks = rows // INTERLEAVE_ROWS, half // (BLOCK // 2)
    q = w.qweight.reshape(groups, INTERLEAVE_ROWS, blocks, 4, 4)  # [group, row, block, p, byte]
    q = q.permute(0, 2, 3, 1, 4)
    # written straight into huge pages where it is large: the layer keeps this copy, and
    # `move_to_huge_pages` then need not fault in and copy it again (docs/architecture.md)
    qweight = huge_pages.weight_buffer((groups, blocks, BLOCK * 4), torch.uint8)
    qweight.view(q.shape).copy_(q)
    scales = _interleave_rows(w.scales)
    if is_symmetric_int4(w):
        return qweight, scales, scales.new_empty(*scales.shape[:2], 0)
    return qweight, scales, _interleave_rows(w.offsets)


def is_symmetric_int4(w: Int4Weight) -> bool:
    """Whether every offset is exactly -8 x its scale (Q4_0: w = scale * (q - 8))."""
    return bool(torch.equal(w.offsets, w.scales * -Q4_0_ZERO) and torch.isfinite(w.offsets).all())


def is_interleaved_int4(qweight: torch.Tensor) -> bool:
    """Whether an int4 qweight is in `interleave_int4`'s layout (3-D) or in rows (2-D)."""
    return qweight.dim() == 3


def deinterleave_int4(
    qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor
) -> Int4Weight:
    """Inverse of `interleave_int4`: the row layout of `Int4Weight`."""
    groups, blocks, _ = qweight.shape
    q = qweight.reshape(groups, blocks, 4, INTERLEAVE_ROWS, 4).permute(0, 3, 1, 2, 4)
    q = q.reshape(groups * INTERLEAVE_ROWS, blocks * BLOCK // 2).contiguous()
    if offsets.shape[-1] == 0:  # symmetric: not stored
        offsets = scales * -Q4_0_ZERO
    return Int4Weight(q, _deinterleave_rows(scales), _deinterleave_rows(offsets))


def _interleave_rows(t: torch.Tensor) -> torch.Tensor:
    rows, cols = t.shape  # [N, G] -> [N/8, G, 8]
    return t.reshape(rows // INTERLEAVE_ROWS, INTERLEAVE_ROWS, cols).transpose(1, 2).contiguous()


def _deinterleave_rows(t: torch.Tensor) -> torch.Tensor:
    groups, cols, _ = t.shape
    return t.transpose(1, 2).reshape(groups * INTERLEAVE_ROWS, cols).contiguous()


PANEL_ROWS = 32  # rows of an int8 VNNI panel: 2 zmm (or 4 ymm) of int32 lanes


def fits_int8_panels(w: Int8Weight) -> bool:
    """Whether `int8_panels` takes this weight: per-channel scales, N and K multiples of 32."""
    rows, cols = w.qweight.shape
    return rows % PANEL_ROWS == 0 and cols % BLOCK == 0 and w.scales.shape[1] == 1


def int8_panels(w: Int8Weight) -> torch.Tensor:
    """The VNNI kernel's layout of a per-channel int8 weight (docs/quantization.md, "int8 on
    VNNI"): rows in panels of 32, each [K/4][32 rows][4 bytes] of `w xor 0x80` (the
    unsigned operand of VPDPBUSD, w + 128), so a 64-byte line holds one 4-byte k step of 16
    rows. Returns uint8 [N/32, K/4, 128]."""
    rows, cols = w.qweight.shape
    if not fits_int8_panels(w):
        raise QuantizationError(
            f"int8 panels need per-channel scales and both dimensions a multiple of 32, "
            f"got {rows} x {cols} with {w.scales.shape[1]} groups"
        )
    q = w.qweight.view(torch.uint8).reshape(rows // PANEL_ROWS, PANEL_ROWS, cols // 4, 4)
    panels = huge_pages.weight_buffer((rows // PANEL_ROWS, cols // 4, PANEL_ROWS * 4), torch.uint8)
    panels.view(rows // PANEL_ROWS, cols // 4, PANEL_ROWS, 4).copy_(q.permute(0, 2, 1, 3))
    panels.bitwise_xor_(0x80)
    return panels


def is_int8_panels(qweight: torch.Tensor) -> bool:
    """Whether an int8 qweight is in `int8_panels`' layout (3-D uint8) or in rows."""
    return qweight.dim() == 3


def int8_rows_from_panels(panels: torch.Tensor) -> torch.Tensor:
    """Inverse of `int8_panels`: the int8 [N, K] rows."""
    npanels, steps, _ = panels.shape
    q = (panels ^ 0x80).view(npanels, steps, PANEL_ROWS, 4).permute(0, 2, 1, 3)
    return q.reshape(npanels * PANEL_ROWS, steps * 4).contiguous().view(torch.int8)


def int8_from_q8_0(qs: torch.Tensor, d: torch.Tensor) -> Int8Weight:
    """GGUF Q8_0 blocks, already split into `qs` int8 [N, K] and `d` fp16 [N, K // 32]."""
    _check_blocks(qs, d, qs.shape[1], torch.int8)
    return Int8Weight(qs.contiguous(), d.float().contiguous())


def int4_from_q4_0(qs: torch.Tensor, d: torch.Tensor) -> Int4Weight:
    """GGUF Q4_0 blocks, already split into `qs` uint8 [N, K // 2] (the 16 bytes of each
    block, in file order) and `d` fp16 [N, K // 32]; w = (q - 8) * d."""
    _check_blocks(qs, d, qs.shape[1] * 2, torch.uint8)
    d = d.to(torch.float16).contiguous()
    return Int4Weight(qs.contiguous(), d, (-Q4_0_ZERO * d.float()).to(torch.float16))


def int8_from_q4_0(qs: torch.Tensor, d: torch.Tensor) -> Int8Weight:
    """GGUF Q4_0 blocks (split as for `int4_from_q4_0`) as int8 in groups of 32: the
    values q - 8 lie in [-8, 7] and keep their scale d, so the weights are unchanged."""
    _check_blocks(qs, d, qs.shape[1] * 2, torch.uint8)
    values = unpack_int4(qs).to(torch.int8) - Q4_0_ZERO
    return Int8Weight(values, d.float().contiguous())


def int4_from_q4_1(qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> Int4Weight:
    """GGUF Q4_1 blocks: `qs` as for `int4_from_q4_0`, `d` and `m` fp16 [N, K // 32];
    w = q * d + m, which is our int4 with scale d and offset m."""
    _check_blocks(qs, d, qs.shape[1] * 2, torch.uint8)
    _check_blocks(qs, m, qs.shape[1] * 2, torch.uint8)
    return Int4Weight(
        qs.contiguous(), d.to(torch.float16).contiguous(), m.to(torch.float16).contiguous()
    )


def _check_blocks(qs: torch.Tensor, d: torch.Tensor, in_features: int, dtype: torch.dtype) -> None:
    if qs.dtype != dtype or qs.dim() != 2:
        raise QuantizationError(
            f"expected {dtype} [N, ...] block data, got {qs.dtype} {tuple(qs.shape)}"
        )
    expected = (qs.shape[0], in_features // BLOCK)
    if in_features % BLOCK or tuple(d.shape) != expected:
        raise QuantizationError(f"block scales have shape {tuple(d.shape)}, expected {expected}")
