"""The fastest a model can possibly run here: decode is bound by reading the weights once
per step, prefill by matmul FLOPs.

What a decode step reads: every decoder-layer weight, the norms and biases, and the
output projection (lm_head). The input embedding is only gathered (a few rows per step),
so an untied embedding table is left out; a tied one is counted once, as the lm_head.
Prefill costs 2 FLOPs per weight of that same set per token (attention's own FLOPs are
left out: small at the prompt lengths we benchmark).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentcpu.errors import InvalidRequestError, ModelLoadError
from agentcpu.hardware.safetensors_header import TensorEntry, read_checkpoint_tensors

EMBEDDING_SUFFIXES = (
    "embed_tokens.weight",
    "tok_embeddings.weight",
    "word_embeddings.weight",
    "wte.weight",
)
LM_HEAD_SUFFIXES = ("lm_head.weight",)
KV_BYTES_PER_ELEMENT = 2  # the KV cache is bf16
SCALE_BYTES = 2  # one bf16 scale per group (symmetric quantization: no zero point)
QUANT_BITS = (4, 8)
FLOPS_PER_PARAM_PER_TOKEN = 2


@dataclass(frozen=True)
class ModelFootprint:
    """Parameter and byte counts of a checkpoint, split by how decode reads them.

    `linear_*`: 2-D+ decoder weights (what quantization shrinks). `lm_head_*`: the output
    projection, i.e. the embedding when tied. `other_*`: norms, biases. `*_rows`: output
    channels (one scale each under per-channel quantization).
    """

    total_params: int
    total_bytes: int
    embedding_params: int
    embedding_bytes: int
    linear_params: int
    linear_bytes: int
    linear_rows: int
    lm_head_params: int
    lm_head_bytes: int
    lm_head_rows: int
    other_params: int
    other_bytes: int
    tied_embeddings: bool
    kv_bytes_per_token: int  # 0 when config.json does not give the attention shape
    weight_dtype: str  # safetensors dtype holding most linear-weight bytes, e.g. "BF16"
    weight_bits: float  # bits per linear weight, scales excluded

    @property
    def decode_params(self) -> int:
        """Weights that take part in every token's forward pass (lm_head included)."""
        return self.linear_params + self.lm_head_params + self.other_params

    @property
    def decode_bytes(self) -> int:
        """Bytes of weights read per decode step."""
        return self.linear_bytes + self.lm_head_bytes + self.other_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "decode_params": self.decode_params,
            "decode_bytes": self.decode_bytes,
        }


def _is_embedding(name: str) -> bool:
    return name.endswith(EMBEDDING_SUFFIXES)


def _is_lm_head(name: str) -> bool:
    return name.endswith(LM_HEAD_SUFFIXES)


def _read_config(model_path: Path) -> dict[str, Any]:
    config_path = (model_path if model_path.is_dir() else model_path.parent) / "config.json"
    if not config_path.is_file():
        return {}
    try:
        return json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {config_path}: {exc}") from exc


def kv_bytes_per_token(config: dict[str, Any]) -> int:
    """K and V bytes one token adds to the cache, over all layers (0 if unknown)."""
    layers = config.get("num_hidden_layers")
    heads = config.get("num_attention_heads")
    if not layers or not heads:
        return 0
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config.get("hidden_size", 0) // heads
    return layers * 2 * kv_heads * head_dim * KV_BYTES_PER_ELEMENT


def _sum(entries: list[TensorEntry]) -> tuple[int, int, int]:
    """(params, bytes, rows) of the given tensors."""
    params = sum(entry.numel for entry in entries)
    nbytes = sum(entry.nbytes for entry in entries)
    rows = sum(entry.shape[0] for entry in entries if entry.shape)
    return params, nbytes, rows


def _main_dtype(entries: list[TensorEntry]) -> str:
    bytes_by_dtype = Counter[str]()
    for entry in entries:
        bytes_by_dtype[entry.dtype] += entry.nbytes
    return bytes_by_dtype.most_common(1)[0][0] if bytes_by_dtype else ""


def _main_bits(entries: list[TensorEntry]) -> float:
    params, nbytes, _ = _sum(entries)
    return 8 * nbytes / params if params else 0.0


def footprint_from_tensors(
    tensors: list[TensorEntry], config: dict[str, Any]
) -> ModelFootprint:
    """Classify tensors (see module docstring). Without a separate lm_head tensor the
    embedding is the lm_head, whatever config says."""
    embedding = [t for t in tensors if _is_embedding(t.name)]
    lm_head = [t for t in tensors if _is_lm_head(t.name)]
    rest = [t for t in tensors if not _is_embedding(t.name) and not _is_lm_head(t.name)]
    total_params, total_bytes, _ = _sum(tensors)
    embedding_params, embedding_bytes, _ = _sum(embedding)
    linear = [t for t in rest if len(t.shape) >= 2]
    linear_params, linear_bytes, linear_rows = _sum(linear)
    other_params, other_bytes, _ = _sum([t for t in rest if len(t.shape) < 2])
    head_params, head_bytes, head_rows = _sum(lm_head or embedding)
    if linear_params + head_params + other_params == 0:
        raise ModelLoadError("the checkpoint holds no weights that a forward pass reads")
    return ModelFootprint(
        total_params=total_params,
        total_bytes=total_bytes,
        embedding_params=embedding_params,
        embedding_bytes=embedding_bytes,
        linear_params=linear_params,
        linear_bytes=linear_bytes,
        linear_rows=linear_rows,
        lm_head_params=head_params,
        lm_head_bytes=head_bytes,
        lm_head_rows=head_rows,
        other_params=other_params,
        other_bytes=other_bytes,
        tied_embeddings=bool(config.get("tie_word_embeddings", not lm_head)),
        kv_bytes_per_token=kv_bytes_per_token(config),
        weight_dtype=_main_dtype(linear or tensors),
        weight_bits=_main_bits(linear or tensors),
    )


# llama.cpp tensor names whose role the Hugging Face suffixes above do not reveal
GGUF_RENAMES = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight"}


def model_footprint(model_dir: str | Path) -> ModelFootprint:
    """Footprint of a safetensors checkpoint (dir, sharded or not, or one file) or of a
    GGUF file (its tensors' stored bytes: quantized blocks count as stored), from the
    headers only. Raises ModelLoadError for a missing or bad checkpoint."""
    path = Path(model_dir)
    if path.suffix == ".gguf":
        return _gguf_footprint(path)
    tensors = read_checkpoint_tensors(path)
    return footprint_from_tensors(tensors, _read_config(path))


def _gguf_footprint(path: Path) -> ModelFootprint:
    from agentcpu.loaders.gguf_file import GGUFModelFile

    gguf = GGUFModelFile(path)
    tensors = [
        TensorEntry(GGUF_RENAMES.get(name, name), info.ggml_type.name, info.shape, info.n_bytes)
        for name, info in gguf.tensors.items()
    ]
    return footprint_from_tensors(tensors, gguf.hf_config())


def _quantized_bytes(
    params: int, rows: int, bits: int, group_size: int | None, offsets: bool = False
) -> int:
    scales = rows if group_size is None else math.ceil(params / group_size)
    return math.ceil(params * bits / 8) + scales * SCALE_BYTES * (2 if offsets else 1)


def quantized_footprint(
    footprint: ModelFootprint,
    bits: int,
    group_size: int | None = None,
    lm_head_bits: int | None = None,
    offsets: bool = False,
) -> ModelFootprint:
    """The footprint after weight-only quantization of the linear layers.

    Assumptions: one 16-bit scale per `group_size` weights along the input dimension
    (group_size None: one per output channel), and a 16-bit offset beside each where
    `offsets` (asymmetric int4; symmetric int4 stores none: `quant.formats`); norms, biases and the
    embedding keep their stored dtype; the lm_head (the embedding when tied) stays as
    stored unless `lm_head_bits` is given: then it is quantized to that many bits with one
    scale per output channel (what `agentcpu.quant` does: int8 under int8 and int4).
    """
    if bits not in QUANT_BITS:
        raise InvalidRequestError(f"bits must be one of {QUANT_BITS}, got {bits}")
    if group_size is not None and group_size < 1:
        raise InvalidRequestError(f"group_size must be None or >= 1, got {group_size}")
    linear_bytes = _quantized_bytes(
        footprint.linear_params, footprint.linear_rows, bits, group_size, offsets
    )
    lm_head_bytes = footprint.lm_head_bytes
    if lm_head_bits is not None:
        if lm_head_bits not in QUANT_BITS:
            raise InvalidRequestError(f"lm_head_bits must be one of {QUANT_BITS}, got {lm_head_bits}")
        lm_head_bytes = _quantized_bytes(
            footprint.lm_head_params, footprint.lm_head_rows, lm_head_bits, None
        )
    return dataclasses.replace(
        footprint, linear_bytes=linear_bytes, lm_head_bytes=lm_head_bytes, weight_bits=bits
    )


def roofline(
    footprint: ModelFootprint, bandwidth_gbs: float, flops: float, context_tokens: int = 0
) -> dict[str, float]:
    """Upper bounds for one stream: decode tok/s = B / (weight bytes + KV bytes of
    `context_tokens`), prefill tok/s = F / (2 * decode_params)."""
    if bandwidth_gbs <= 0 or flops <= 0:
        raise InvalidRequestError(
            f"bandwidth and flops must be > 0, got {bandwidth_gbs} GB/s, {flops} FLOP/s"
        )
    if context_tokens < 0:
        raise InvalidRequestError(f"context_tokens must be >= 0, got {context_tokens}")
    step_bytes = footprint.decode_bytes + context_tokens * footprint.kv_bytes_per_token
    decode_step_s = step_bytes / (bandwidth_gbs * 1e9)
    return {
        "step_bytes": step_bytes,
        "decode_step_ms": decode_step_s * 1e3,
        "decode_tok_s": 1 / decode_step_s,
        "prefill_tok_s": flops / (FLOPS_PER_PARAM_PER_TOKEN * footprint.decode_params),
    }


def agentcpu_quant_footprint(
    footprint: ModelFootprint, method: str, group_size: int, symmetric: bool
) -> ModelFootprint:
    """The bytes a model holds under `--quant` (`quant.parse_quant`'s method, group size,
    symmetric): int8 per output channel; int4 per group, with an offset beside each scale
    unless symmetric; the LM head (a tied embedding too) int8 under either."""
    bits, group = (8, None) if method == "int8" else (4, group_size)
    offsets = method == "int4" and not symmetric
    return quantized_footprint(footprint, bits, group, lm_head_bits=8, offsets=offsets)


def roofline_for_quant(
    footprint: ModelFootprint,
    bits: int,
    group_size: int | None,
    bandwidth_gbs: float,
    flops: float,
    lm_head_bits: int | None = None,
    offsets: bool = False,
) -> dict[str, float]:
    """`roofline` of the weight-only-quantized model (see `quantized_footprint`). Pass as
    `flops` the rate of the matmul the quantized kernels actually run (bf16 after dequant,
    or int8)."""
    quantized = quantized_footprint(footprint, bits, group_size, lm_head_bits, offsets)
    return roofline(quantized, bandwidth_gbs, flops)
