"""Tensor names, dtypes, shapes and byte sizes of a safetensors checkpoint, read from the
file headers alone: the weights are never loaded, so this is instant for any model size.

Format: an 8-byte little-endian header length N, then N bytes of JSON mapping each tensor
name to {dtype, shape, data_offsets}, plus an optional "__metadata__" entry.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from agentcpu.errors import ModelLoadError

HEADER_LENGTH_BYTES = 8
MAX_HEADER_BYTES = 100 << 20  # the format's own limit; a larger value means a bad file
METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _read_header_json(path: Path) -> dict:
    with path.open("rb") as file:
        length = int.from_bytes(file.read(HEADER_LENGTH_BYTES), "little")
        if not 0 < length <= MAX_HEADER_BYTES:
            raise ModelLoadError(f"{path}: not a safetensors file (header length {length})")
        raw = file.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: safetensors header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: safetensors header is not a JSON object")
    return header


def _entry(path: Path, name: str, info: object) -> TensorEntry:
    try:
        start, end = info["data_offsets"]  # type: ignore[index]
        return TensorEntry(name, str(info["dtype"]), tuple(info["shape"]), int(end - start))  # type: ignore[index]
    except (TypeError, KeyError, ValueError) as exc:
        raise ModelLoadError(f"{path}: malformed header entry for tensor {name!r}") from exc


def read_safetensors_header(path: str | Path) -> list[TensorEntry]:
    """The tensors one safetensors file holds; raises ModelLoadError on a malformed file."""
    path = Path(path)
    try:
        header = _read_header_json(path)
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    return [_entry(path, name, info) for name, info in header.items() if name != METADATA_KEY]


def checkpoint_files(model_path: str | Path) -> list[Path]:
    """The *.safetensors files of a model directory (or the one file given)."""
    path = Path(model_path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ModelLoadError(f"model path {path} does not exist")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors files in {path}")
    return files


def read_checkpoint_tensors(model_path: str | Path) -> list[TensorEntry]:
    """All tensors of a (possibly sharded) checkpoint; a name in two shards is an error."""
    entries: dict[str, TensorEntry] = {}
    for file in checkpoint_files(model_path):
        for entry in read_safetensors_header(file):
            if entry.name in entries:
                raise ModelLoadError(f"tensor {entry.name!r} appears in more than one shard")
            entries[entry.name] = entry
    return list(entries.values())
