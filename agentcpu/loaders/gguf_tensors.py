"""A GGUF file's tensors under Hugging Face names, as stored or dequantized.

Two steps, so quantized weights need not go through float:

1. `iter_gguf_tensors` yields each tensor as stored (`GGUFTensor`: ggml type plus raw
   rows), renamed to its Hugging Face name, with llama.cpp's q/k row permutation
   already undone. Rows are whole ggml blocks, so the permutation moves blocks intact.
2. `dequantize` turns one into a float tensor. `iter_hf_tensors` chains both and feeds
   `models.loader.load_weights`.

Quantized modules branch off after step 1: `quantized_weight` turns a tensor's raw
rows into our int8 / int4 format with no float step, for the ggml types that format
holds exactly (`exact_format`: Q4_0 and Q4_1 in int4, Q8_0 and Q4_0 in int8 with groups
of 32). `models.loading` fills the fused q/k/v and gate/up projections part by part,
each part's rows in its row range (blocks never cross rows).

Shapes: GGUF lists dimensions fastest-first (ne[0] = columns); `gguf_header` reverses
them, so a tensor's rows here are the Hugging Face rows.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from agentcpu.config import ModelConfig
from agentcpu.errors import ModelLoadError
from agentcpu.loaders.gguf_file import ROPE_FREQS_TENSOR, GGUFModelFile
from agentcpu.quant.formats import (
    Int4Weight,
    Int8Weight,
    int4_from_q4_0,
    int4_from_q4_1,
    int8_from_q4_0,
    int8_from_q8_0,
)

Q = GGMLQuantizationType
GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Read by the config (llama3 rope scaling), not loaded as a weight.
CONFIG_TENSORS = (ROPE_FREQS_TENSOR,)
# Architectures whose GGUF q/k rows are in ggml's interleaved rope order (llama.cpp's
# LLAMA_ROPE_TYPE_NORM): convert_hf_to_gguf.py's LlamaModel.permute reorders them, and
# our rotate-half rope needs the Hugging Face order back. Qwen2/3 use NEOX order: as is.
PERMUTED_QK_ARCHITECTURES = ("llama",)
DEQUANT_CHUNK_ELEMENTS = 8 * 1024**2  # fp32 scratch per dequantized chunk: 32 MiB
Q_GROUP = 32  # elements per Q8_0 / Q4_0 block
Q4_0_OFFSET = 8


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor as stored, under its Hugging Face name.

    `data` is a numpy array (memory-mapped unless rows were permuted): [rows, cols] for
    F32/F16, [rows, bytes per row] uint8 for BF16 and the block-quantized types.
    `shape` is the logical Hugging Face shape.
    """

    name: str
    gguf_name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray


def hf_tensor_name(gguf_name: str) -> str:
    """The Hugging Face name of a GGUF tensor name; ModelLoadError if it has none."""
    stem, _, kind = gguf_name.rpartition(".")
    if stem in GLOBAL_NAMES and kind == "weight":
        return f"{GLOBAL_NAMES[stem]}.weight"
    match = LAYER_TENSOR.fullmatch(gguf_name)
    if match and match.group(2) in LAYER_NAMES:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{LAYER_NAMES[part]}.{kind}"
    raise ModelLoadError(f"GGUF tensor {gguf_name!r} has no counterpart in agentcpu's models")


def iter_gguf_tensors(gguf: GGUFModelFile, cfg: ModelConfig) -> Iterator[GGUFTensor]:
    """Every weight of the file, as stored, renamed, q/k rows in Hugging Face order."""
    unpermute = gguf.architecture in PERMUTED_QK_ARCHITECTURES
    for gguf_name, tensor in gguf.tensors.items():
        if gguf_name in CONFIG_TENSORS:
            continue
        name = hf_tensor_name(gguf_name)
        data, shape = tensor.data, tensor.shape
        if unpermute and (heads := _permuted_heads(gguf_name, cfg)):
            data = unpermute_rows(data, heads)
        yield GGUFTensor(name, gguf_name, tensor.ggml_type, shape, data)


def _permuted_heads(gguf_name: str, cfg: ModelConfig) -> int | None:
    if gguf_name.endswith((".attn_q.weight", ".attn_q.bias")):
        return cfg.num_heads
    if gguf_name.endswith((".attn_k.weight", ".attn_k.bias")):
        return cfg.num_kv_heads
    return None


def unpermute_rows(rows: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf.py's `LlamaModel.permute` along the first axis.

    The converter interleaves each head's two rotary halves (rows i and i + d/2 become
    neighbours); this puts them back. Works on raw quantized rows too.
    """
    shape = rows.shape
    if shape[0] % (2 * num_heads):
        raise ModelLoadError(f"cannot split {shape[0]} q/k rows into {num_heads} rotary heads")
    per_half = shape[0] // num_heads // 2
    return np.ascontiguousarray(
        rows.reshape(num_heads, per_half, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
    )


def iter_hf_tensors(
    gguf: GGUFModelFile, cfg: ModelConfig, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, float tensor) for `load_weights`: every type dequantized."""
    for tensor in iter_gguf_tensors(gguf, cfg):
        yield tensor.name, dequantize(tensor, dtype)


# -- dequantization ---------------------------------------------------------------


def dequantize(tensor: GGUFTensor, dtype: torch.dtype) -> torch.Tensor:
    """The tensor as a float tensor in its Hugging Face shape.

    F32/F16/BF16 come back as views of the file in their stored dtype (no copy:
    `load_weights` casts while copying into the model); block-quantized types are
    expanded in row chunks into a new `dtype` tensor, so fp32 scratch stays bounded.
    """
    qtype = tensor.ggml_type
    try:
        if qtype in (Q.F32, Q.F16):
            return _as_torch(tensor.data).reshape(tensor.shape)
        if qtype == Q.BF16:
            return _as_torch(tensor.data.view(np.int16)).view(torch.bfloat16).reshape(tensor.shape)
        return _dequantize_blocks(tensor, dtype)
    except (ValueError, NotImplementedError, RuntimeError) as e:
        raise ModelLoadError(
            f"cannot dequantize GGUF tensor {tensor.gguf_name!r} of type {qtype.name}: {e}"
        ) from None


def _as_torch(array: np.ndarray) -> torch.Tensor:
    # The file is mapped read-only and only ever read through these views.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def _dequantize_blocks(tensor: GGUFTensor, dtype: torch.dtype) -> torch.Tensor:
    rows = tensor.data.reshape(-1, tensor.data.shape[-1])
    cols = tensor.shape[-1]
    out = torch.empty(rows.shape[0], cols, dtype=dtype)
    step = max(1, DEQUANT_CHUNK_ELEMENTS // cols)
    expand = BLOCK_DEQUANTIZERS.get(tensor.ggml_type) or _gguf_dequantizer(tensor.ggml_type)
    scratch = None if dtype == torch.float32 else torch.empty(min(step, rows.shape[0]), cols)
    for start in range(0, rows.shape[0], step):
        chunk = rows[start : start + step]
        target = out[start : start + chunk.shape[0]]
        if scratch is None:
            expand(chunk, target.numpy())
        else:
            expand(chunk, scratch[: chunk.shape[0]].numpy())
            target.copy_(scratch[: chunk.shape[0]])
    return out.reshape(tensor.shape)


def _gguf_dequantizer(qtype: GGMLQuantizationType):
    """The `gguf` package's numpy dequantizer (K-quants and every other type)."""
    if qtype not in GGML_QUANT_SIZES:
        raise NotImplementedError(f"unknown ggml type {qtype}")

    def expand(rows: np.ndarray, out: np.ndarray) -> None:
        out[...] = quants.dequantize(np.asarray(rows), qtype)

    return expand


# Q8_0 / Q4_0 blocks: an fp16 scale, then 32 values (Q4_0: 16 bytes, low nibbles are
# elements 0-15, high nibbles 16-31, stored with an offset of 8).
Q8_0_BLOCK = np.dtype([("scale", "<f2"), ("values", "i1", (Q_GROUP,))])
Q4_0_BLOCK = np.dtype([("scale", "<f2"), ("packed", "u1", (Q_GROUP // 2,))])
# Q4_1: w = q * scale + min, nibbles as in Q4_0.
Q4_1_BLOCK = np.dtype([("scale", "<f2"), ("min", "<f2"), ("packed", "u1", (Q_GROUP // 2,))])


def _blocks(rows: np.ndarray, block: np.dtype) -> np.ndarray:
    """[R, bytes] -> structured [R, blocks] view (no copy)."""
    return np.ascontiguousarray(rows).view(block)


def _q4_0_values(packed: np.ndarray) -> np.ndarray:
    """[R, B, 16] packed bytes -> [R, B, 32] int8 values in [0, 16)."""
    values = np.empty((*packed.shape[:-1], 2, Q_GROUP // 2), np.int8)
    np.bitwise_and(packed, 0x0F, out=values[..., 0, :], casting="unsafe")
    np.right_shift(packed, 4, out=values[..., 1, :], casting="unsafe")
    return values.reshape(*packed.shape[:-1], Q_GROUP)


def q8_0_blocks(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 rows [R, bytes] -> int8 values [R, C] and fp16 scales [R, C / 32];
    weight = value * scale of its 32-column group."""
    blocks = _blocks(rows, Q8_0_BLOCK)
    values = torch.from_numpy(blocks["values"].reshape(rows.shape[0], -1).copy())
    return values, torch.from_numpy(blocks["scale"].copy())


def q4_0_blocks(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 rows [R, bytes] -> packed uint8 [R, C / 2] (each block's 16 bytes in file
    order: byte j holds weight j in its low nibble, weight j + 16 in its high nibble)
    and fp16 scales [R, C / 32]; weight = (nibble - 8) * scale of its 32-column group."""
    blocks = _blocks(rows, Q4_0_BLOCK)
    packed = blocks["packed"].reshape(rows.shape[0], -1).copy()
    return torch.from_numpy(packed), torch.from_numpy(blocks["scale"].copy())


def q4_1_blocks(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1 rows [R, bytes] -> packed uint8 [R, C / 2] (as `q4_0_blocks`), fp16 scales
    and fp16 minimums [R, C / 32]; weight = nibble * scale + minimum."""
    blocks = _blocks(rows, Q4_1_BLOCK)
    packed = blocks["packed"].reshape(rows.shape[0], -1).copy()
    return (
        torch.from_numpy(packed),
        torch.from_numpy(blocks["scale"].copy()),
        torch.from_numpy(blocks["min"].copy()),
    )


def _expand_q8_0(rows: np.ndarray, out: np.ndarray) -> None:
    blocks = _blocks(rows, Q8_0_BLOCK)
    grouped = out.reshape(*blocks.shape, Q_GROUP)
    np.multiply(blocks["values"], blocks["scale"][..., None], out=grouped, dtype=np.float32)


def _expand_q4_0(rows: np.ndarray, out: np.ndarray) -> None:
    blocks = _blocks(rows, Q4_0_BLOCK)
    values = _q4_0_values(blocks["packed"])
    values -= Q4_0_OFFSET
    grouped = out.reshape(*blocks.shape, Q_GROUP)
    np.multiply(values, blocks["scale"][..., None], out=grouped, dtype=np.float32)


BLOCK_DEQUANTIZERS = {Q.Q8_0: _expand_q8_0, Q.Q4_0: _expand_q4_0}


# -- quantized weights without a float step -------------------------------------------

QuantizedWeight = Int8Weight | Int4Weight
BlockConverter = Callable[[np.ndarray], QuantizedWeight]
# (our format, ggml type) -> raw rows [R, bytes] to that format, the weights unchanged
# bit for bit (Q4_0 in int8: values q - 8 with scale d).
DIRECT_CONVERSIONS: dict[tuple[str, GGMLQuantizationType], BlockConverter] = {
    ("int4", Q.Q4_0): lambda rows: int4_from_q4_0(*q4_0_blocks(rows)),
    ("int4", Q.Q4_1): lambda rows: int4_from_q4_1(*q4_1_blocks(rows)),
    ("int8", Q.Q8_0): lambda rows: int8_from_q8_0(*q8_0_blocks(rows)),
    ("int8", Q.Q4_0): lambda rows: int8_from_q4_0(*q4_0_blocks(rows)),
}
QUANTIZED_FORMATS = ("int4", "int8")  # smallest first
DIRECT_GROUP_SIZE = Q_GROUP  # the group size of every directly mapped weight


def exact_format(
    types: Iterable[GGMLQuantizationType], allowed: Iterable[str] = QUANTIZED_FORMATS
) -> str | None:
    """The smallest of our quantized formats, among `allowed`, that holds the weights of
    every ggml type in `types` exactly; None if there is none (they stay float)."""
    types, allowed = set(types), set(allowed)
    for fmt in QUANTIZED_FORMATS:
        if fmt in allowed and types and all((fmt, t) in DIRECT_CONVERSIONS for t in types):
            return fmt
    return None


def quantized_weight(tensor: GGUFTensor, fmt: str) -> QuantizedWeight:
    """A 2-D block-quantized tensor in our `fmt` (int8 / int4, group 32), no float step."""
    convert = DIRECT_CONVERSIONS.get((fmt, tensor.ggml_type))
    if convert is None or len(tensor.shape) != 2:
        raise ModelLoadError(
            f"GGUF tensor {tensor.gguf_name!r} ({tensor.ggml_type.name}, shape "
            f"{tensor.shape}) has no exact {fmt} form"
        )
    return convert(tensor.data.reshape(tensor.shape[0], -1))
