"""Parse a GGUF file's header: metadata key/values and the tensor table.

`gguf.GGUFReader` builds numpy views for every element of every metadata array, which
takes tens of seconds for a 150k-token vocabulary with its merges. This parser walks
the same format (GGUF v2/v3, little-endian) with `struct` over one memory map, decodes
string arrays in a tight loop and numeric arrays with `np.frombuffer`, and leaves
tensor data mapped. Types, block sizes and value kinds come from the `gguf` package.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.constants import GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC
from gguf.quants import quant_shape_to_byte_shape

SUPPORTED_VERSIONS = (2, 3)
ALIGNMENT_KEY = "general.alignment"
V = GGUFValueType
SCALAR_FORMATS = {
    V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I",
    V.INT32: "<i", V.FLOAT32: "<f", V.BOOL: "<?", V.UINT64: "<Q", V.INT64: "<q",
    V.FLOAT64: "<d",
}  # fmt: skip
NUMPY_TYPES = {
    V.UINT8: np.uint8, V.INT8: np.int8, V.UINT16: np.uint16, V.INT16: np.int16,
    V.UINT32: np.uint32, V.INT32: np.int32, V.FLOAT32: np.float32, V.BOOL: np.bool_,
    V.UINT64: np.uint64, V.INT64: np.int64, V.FLOAT64: np.float64,
}  # fmt: skip
# ggml types whose elements numpy holds directly; others are viewed as raw bytes.
ELEMENT_TYPES = {
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


class GGUFFormatError(ValueError):
    """The bytes are not a GGUF file this parser understands."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the file; `shape` is in row-major (Hugging Face) order and `data`
    a view of the mapped file: elements for float/int types, bytes for block types."""

    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]
    data_offset: int
    n_bytes: int
    data: np.ndarray


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]


class _Cursor:
    """Sequential little-endian reads over a buffer; GGUFFormatError past its end."""

    def __init__(self, buffer: memoryview):
        self.buffer, self.offset = buffer, 0

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.offset + size > len(self.buffer):
            raise GGUFFormatError(f"unexpected end of file at byte {self.offset}")
        (value,) = struct.unpack_from(fmt, self.buffer, self.offset)
        self.offset += size
        return value

    def string(self) -> str:
        length = self.unpack("<Q")
        end = self.offset + length
        if end > len(self.buffer):
            raise GGUFFormatError(f"string of {length} bytes runs past the end of the file")
        text = bytes(self.buffer[self.offset : end]).decode("utf-8", errors="replace")
        self.offset = end
        return text

    def value(self, kind: int) -> Any:
        if kind == V.STRING:
            return self.string()
        if kind == V.ARRAY:
            return self.array()
        if kind not in SCALAR_FORMATS:
            raise GGUFFormatError(f"unknown metadata value type {kind}")
        return self.unpack(SCALAR_FORMATS[V(kind)])

    def array(self) -> list[Any]:
        kind, count = self.unpack("<I"), self.unpack("<Q")
        if kind == V.STRING:
            return self._strings(count)
        if kind in NUMPY_TYPES:
            dtype = np.dtype(NUMPY_TYPES[V(kind)])
            end = self.offset + count * dtype.itemsize
            if end > len(self.buffer):
                raise GGUFFormatError(f"array of {count} values runs past the end of the file")
            values = np.frombuffer(self.buffer, dtype, count, self.offset).tolist()
            self.offset = end
            return values
        return [self.value(kind) for _ in range(count)]

    def _strings(self, count: int) -> list[str]:
        buffer, offset, size = self.buffer, self.offset, len(self.buffer)
        unpack = struct.Struct("<Q").unpack_from
        out = []
        for _ in range(count):
            if offset + 8 > size:
                raise GGUFFormatError("string array runs past the end of the file")
            (length,) = unpack(buffer, offset)
            start, offset = offset + 8, offset + 8 + length
            if offset > size:
                raise GGUFFormatError("string array runs past the end of the file")
            out.append(str(buffer[start:offset], "utf-8", "replace"))
        self.offset = offset
        return out


def read_header(path: str | Path) -> GGUFHeader:
    """Metadata and tensor table of a GGUF file; GGUFFormatError if malformed."""
    with open(path, "rb") as f:
        if Path(path).stat().st_size == 0:
            raise GGUFFormatError("the file is empty")
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    cursor = _Cursor(memoryview(mapped))
    magic = cursor.unpack("<I")
    if magic != GGUF_MAGIC:
        raise GGUFFormatError(f"bad magic {magic:#010x} (not a GGUF file)")
    version = cursor.unpack("<I")
    if version not in SUPPORTED_VERSIONS:
        raise GGUFFormatError(
            f"GGUF version {version} is not supported (supported: 2, 3; big-endian files "
            "are not supported)"
        )
    tensor_count, kv_count = cursor.unpack("<Q"), cursor.unpack("<Q")
    metadata = {}
    for _ in range(kv_count):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.unpack("<I"))
    infos = [_tensor_info(cursor) for _ in range(tensor_count)]
    alignment = int(metadata.get(ALIGNMENT_KEY, GGUF_DEFAULT_ALIGNMENT))
    if alignment <= 0 or alignment & (alignment - 1):
        raise GGUFFormatError(f"{ALIGNMENT_KEY} {alignment} is not a power of two")
    data_start = -(-cursor.offset // alignment) * alignment
    file_array = np.frombuffer(mapped, dtype=np.uint8)
    tensors = {}
    for name, ggml_type, dims, offset in infos:
        if name in tensors:
            raise GGUFFormatError(f"tensor {name!r} appears twice")
        tensors[name] = _tensor(file_array, name, ggml_type, dims, data_start + offset)
    return GGUFHeader(version, metadata, tensors)


def _tensor_info(cursor: _Cursor) -> tuple[str, GGMLQuantizationType, tuple[int, ...], int]:
    name = cursor.string()
    n_dims = cursor.unpack("<I")
    dims = tuple(cursor.unpack("<Q") for _ in range(n_dims))
    raw_type = cursor.unpack("<I")
    try:
        ggml_type = GGMLQuantizationType(raw_type)
    except ValueError:
        raise GGUFFormatError(f"tensor {name!r} has unknown ggml type {raw_type}") from None
    return name, ggml_type, tuple(reversed(dims)), cursor.unpack("<Q")


def _tensor(
    file_array: np.ndarray, name: str, ggml_type: GGMLQuantizationType, shape: tuple, start: int
) -> TensorInfo:
    if ggml_type not in GGML_QUANT_SIZES:
        raise GGUFFormatError(f"tensor {name!r} has ggml type {ggml_type.name} of unknown size")
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    n_elements = int(np.prod(shape, dtype=np.int64))
    if shape and shape[-1] % block_size:
        raise GGUFFormatError(f"tensor {name!r}: rows of {shape[-1]} are not whole blocks")
    n_bytes = n_elements // block_size * type_size
    if start + n_bytes > file_array.size:
        raise GGUFFormatError(
            f"the file is truncated: tensor {name!r} ends at byte {start + n_bytes}, "
            f"the file has {file_array.size}"
        )
    raw = file_array[start : start + n_bytes]
    if ggml_type in ELEMENT_TYPES:
        data = raw.view(ELEMENT_TYPES[ggml_type]).reshape(shape)
    else:
        data = raw.reshape(quant_shape_to_byte_shape(shape, ggml_type))
    return TensorInfo(name, ggml_type, shape, start, n_bytes, data)
