"""From a model path to a filled model, its tokenizer and a resolved EngineConfig."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from gguf import GGMLQuantizationType
from torch import nn

from agentcpu.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from agentcpu.errors import ModelLoadError
from agentcpu.hardware.huge_pages import move_to_huge_pages
from agentcpu.layers.linear import Linear
from agentcpu.layers.packed_linear import pack_linears
from agentcpu.loaders.gguf_file import GGUFModelFile
from agentcpu.loaders.gguf_tensors import (
    CONFIG_TENSORS,
    DIRECT_GROUP_SIZE,
    QUANTIZED_FORMATS,
    GGUFTensor,
    dequantize,
    exact_format,
    hf_tensor_name,
    iter_gguf_tensors,
    quantized_weight,
)
from agentcpu.loaders.safetensors_dir import iter_safetensors
from agentcpu.models.loader import DTYPES, build_model, load_weights
from agentcpu.quant.modules import Int4Linear, Int8Linear, QuantizedLinear

log = logging.getLogger(__name__)

DEFAULT_MAX_MODEL_LEN = 32768
GGUF_SUFFIX = ".gguf"
DIRECT_MODULES = {"int8": Int8Linear, "int4": Int4Linear}
EMBED_TENSOR = "model.embed_tokens.weight"
FLOAT_TYPES = {"F32", "F16", "BF16"}


def read_model_config(model: str) -> ModelConfig:
    path = Path(model)
    if not path.exists():
        raise ModelLoadError(f"model path {model} does not exist")
    if _is_gguf_file(path):
        return GGUFModelFile(path).model_config()
    return ModelConfig.from_model_dir(path)


def resolve_engine_config(
    model: str,
    dtype: str = "bfloat16",
    max_model_len: int | None = None,
    kv_cache_gb: float = 1.0,
    block_size: int = 16,
    enable_prefix_caching: bool = True,
    max_num_seqs: int = 64,
    max_num_batched_tokens: int = 1024,
    max_step_ms: float = 0.0,
    threads: int = 0,
    quant: str | None = None,
    pin_ttl_s: float = 30.0,
    spill_gb: float = 0.0,
    spill_dir: str | None = None,
) -> EngineConfig:
    """Turn user-facing options (with "auto" = None) into a frozen EngineConfig."""
    model_config = read_model_config(model)
    limit = min(model_config.max_position_embeddings, DEFAULT_MAX_MODEL_LEN)
    if max_model_len is None:
        max_model_len = limit
    elif max_model_len > model_config.max_position_embeddings:
        raise ModelLoadError(
            f"max_model_len {max_model_len} exceeds the model's max_position_embeddings "
            f"{model_config.max_position_embeddings}"
        )
    return EngineConfig(
        model=str(model),
        model_config=model_config,
        dtype=dtype,
        max_model_len=max_model_len,
        threads=threads,
        quant=quant,
        cache=CacheConfig(
            block_size,
            kv_cache_gb,
            enable_prefix_caching,
            pin_ttl_s=pin_ttl_s,
            spill_gb=spill_gb,
            spill_dir=spill_dir,
        ),
        scheduler=SchedulerConfig(max_num_seqs, max_num_batched_tokens, max_step_ms),
    )


def load_model_and_tokenizer(config: EngineConfig) -> tuple[nn.Module, object | None]:
    """The filled model and the tokenizer (None when the directory has no tokenizer)."""
    from agentcpu.quant import apply_quant, interleave_int4_layers, lay_out_int8_layers

    if _is_gguf_file(config.model):
        model, tokenizer = _load_gguf(config)
    else:
        model = build_model(config.model_config, config.dtype, config.max_model_len)
        load_weights(model, iter_safetensors(config.model))
        tokenizer = load_tokenizer(config.model)
    model = apply_quant(model, config.quant)
    pack_linears(model)  # bf16 layers left after quantization, where AVX-512 BF16 exists
    interleave_int4_layers(model)  # int4 layers (--quant int4*, GGUF Q4_0 / Q4_1)
    lay_out_int8_layers(model)  # per-channel int8 layers (--quant int8, the int8 LM head) on VNNI
    move_to_huge_pages(model)  # decode streams the weights: 2 MiB pages (hardware/huge_pages.py)
    return model, tokenizer


def _is_gguf_file(model: str | Path) -> bool:
    """A single-file GGUF checkpoint (llama.cpp's format) rather than an HF directory."""
    path = Path(model)
    return path.suffix.lower() == GGUF_SUFFIX and path.is_file()


def _load_gguf(config: EngineConfig) -> tuple[nn.Module, object | None]:
    from agentcpu.loaders.gguf_tokenizer import tokenizer_from_gguf

    gguf = GGUFModelFile(config.model)
    return load_gguf_model(gguf, config), tokenizer_from_gguf(gguf)


def load_gguf_model(gguf: GGUFModelFile, config: EngineConfig) -> nn.Module:
    """The model filled from an opened GGUF file.

    A linear layer whose checkpoint weights (all parts of a fused q/k/v or gate/up) are
    of ggml types that one of our quantized formats holds exactly becomes an
    `Int8Linear` / `Int4Linear` filled from the file's blocks, with no float step: the
    smallest such format (Q4_0/Q4_1 -> int4; Q8_0, or Q8_0 mixed with Q4_0 -> int8).
    Every other tensor (embeddings, norms, biases of float layers, K-quants, F16...) is
    dequantized into the model dtype as before, and a layer with any such part stays
    float whole. `config.quant` limits the direct formats to its method; the layers
    left float are then quantized by `apply_quant` from their dequantized weights.
    """
    from agentcpu.quant import parse_quant

    cfg, dtype = config.model_config, DTYPES[config.dtype]
    allowed = QUANTIZED_FORMATS if config.quant is None else (parse_quant(config.quant)[0],)
    # under --quant the head is int8 whatever the method (agentcpu.quant.model), so a Q8_0
    # head (or tied embedding) is kept as the file's blocks rather than requantized
    head_formats = allowed if config.quant is None else allowed + ("int8",)
    swapped = []  # the hook's (targets, float layers), set while the model is on meta

    def swap(model: nn.Module) -> None:
        swapped.append(_swap_direct_linears(model, _gguf_types(gguf), allowed, head_formats))

    model = build_model(cfg, config.dtype, config.max_model_len, before_allocation=swap)
    targets, floats = swapped[0]
    direct, dequantized = _fill_from_gguf(model, gguf, cfg, dtype, targets, head_formats)
    log.info("%s", gguf_load_summary(direct, dequantized))
    if config.quant is not None and floats:
        _log_requantized(config.quant, floats)
    return model


@dataclass(frozen=True)
class _DirectTarget:
    """Where one GGUF tensor goes in a directly quantized layer: rows start.. of its
    weight (`fmt`) or of its bias."""

    module: QuantizedLinear
    fmt: str
    start: int
    rows: int
    is_bias: bool

    def load(self, tensor: GGUFTensor, dtype: torch.dtype) -> None:
        columns = () if self.is_bias else (self.module.in_features,)
        if tuple(tensor.shape) != (self.rows, *columns):
            raise ModelLoadError(
                f"tensor {tensor.name!r} has shape {tuple(tensor.shape)}, "
                f"the model expects {(self.rows, *columns)}"
            )
        if self.is_bias:
            self.module.load_bias_rows(self.start, dequantize(tensor, dtype))
        else:
            self.module.load_rows(self.start, quantized_weight(tensor, self.fmt))


def _gguf_types(gguf: GGUFModelFile) -> dict[str, GGMLQuantizationType]:
    """Hugging Face tensor name -> its ggml type in the file."""
    return {
        hf_tensor_name(name): info.ggml_type
        for name, info in gguf.tensors.items()
        if name not in CONFIG_TENSORS
    }


def _checkpoint_parts(model: nn.Module, path: str, layer: Linear) -> list[tuple[str, int, int]]:
    """(checkpoint prefix, first row, rows) of each part of the layer at `path`."""
    prefix, _, leaf = path.rpartition(".")
    parts = [
        (f"{prefix}.{ckpt_leaf}", *layer.shard_rows[shard])
        for ckpt_leaf, (fused, shard) in model.packed_modules.items()
        if fused == leaf
    ]
    return parts or [(path, 0, layer.out_features)]


def _swap_direct_linears(
    model: nn.Module,
    types: dict[str, GGMLQuantizationType],
    allowed: tuple[str, ...],
    head_formats: tuple[str, ...],
) -> tuple[dict[str, _DirectTarget], Counter]:
    """Replace each linear layer that maps directly (the lm_head: to one of `head_formats`)
    by an empty quantized module.

    Returns the targets of its tensors by name, and the ggml types of the weights of the
    layers left float (for the log)."""
    targets: dict[str, _DirectTarget] = {}
    floats: Counter = Counter()
    layers = [(path, m) for path, m in model.named_modules() if isinstance(m, Linear)]
    for path, layer in layers:
        parts = _checkpoint_parts(model, path, layer)
        part_types = [types.get(f"{prefix}.weight") for prefix, _, _ in parts]
        fmt = exact_format(part_types, head_formats if path == "lm_head" else allowed)
        if fmt is None:
            floats.update(t.name for t in part_types if t is not None)
            continue
        module = DIRECT_MODULES[fmt].empty(
            layer.out_features,
            layer.in_features,
            DIRECT_GROUP_SIZE,
            None if layer.bias is None else layer.bias.dtype,
        )
        model.set_submodule(path, module)
        for prefix, start, rows in parts:
            targets[f"{prefix}.weight"] = _DirectTarget(module, fmt, start, rows, False)
            if layer.bias is not None:
                targets[f"{prefix}.bias"] = _DirectTarget(module, fmt, start, rows, True)
    return targets, floats


def _fill_from_gguf(
    model: nn.Module,
    gguf: GGUFModelFile,
    cfg: ModelConfig,
    dtype: torch.dtype,
    targets: dict[str, _DirectTarget],
    head_formats: tuple[str, ...] = (),
) -> tuple[Counter, Counter]:
    """Load every tensor: blocks into the direct targets, the rest dequantized through
    `load_weights`. Returns tensor counts by (format, ggml type) and by ggml type.

    A tied embedding stored in a block format one of `head_formats` holds exactly also
    becomes the LM head as those blocks (llama.cpp reads its tied Q8_0 head so): the
    float table stays for the row lookup, and logits read 1 byte per weight, not 2."""
    direct: Counter = Counter()
    dequantized: Counter = Counter()
    loaded: set[str] = set()

    def float_tensors():
        for tensor in iter_gguf_tensors(gguf, cfg):
            if tensor.name == EMBED_TENSOR and getattr(model, "lm_head", False) is None:
                fmt = exact_format([tensor.ggml_type], head_formats)
                if fmt is not None:
                    model.lm_head = _tied_head_from_blocks(tensor, fmt)
                    direct[(fmt, tensor.ggml_type.name)] += 1
            target = targets.get(tensor.name)
            if target is None:
                dequantized[tensor.ggml_type.name] += 1
                yield tensor.name, dequantize(tensor, dtype)
                continue
            if tensor.name in loaded:
                raise ModelLoadError(f"checkpoint tensor {tensor.name!r} appears twice")
            target.load(tensor, dtype)
            loaded.add(tensor.name)
            if target.is_bias:
                dequantized[tensor.ggml_type.name] += 1
            else:
                direct[(target.fmt, tensor.ggml_type.name)] += 1

    load_weights(model, float_tensors())
    missing = sorted(set(targets) - loaded)
    if missing:
        raise ModelLoadError(f"checkpoint is missing tensor(s) {', '.join(missing[:3])}")
    return direct, dequantized


def _tied_head_from_blocks(tensor, fmt: str) -> QuantizedLinear:
    rows, columns = tensor.shape
    head = DIRECT_MODULES[fmt].empty(rows, columns, DIRECT_GROUP_SIZE, None)
    head.load_rows(0, quantized_weight(tensor, fmt))
    return head


def gguf_load_summary(direct: Counter, dequantized: Counter) -> str:
    """One line: "GGUF Q8_0 weights -> int8 modules (15 tensors), 12 tensors
    dequantized (F32 x11, Q8_0 x1)"."""
    parts = []
    for fmt in QUANTIZED_FORMATS:
        sources = sorted(t for f, t in direct if f == fmt)
        if sources:
            count = sum(n for (f, _), n in direct.items() if f == fmt)
            parts.append(f"GGUF {'+'.join(sources)} weights -> {fmt} modules ({count} tensors)")
    if not parts:
        parts.append("GGUF weights: no direct int8/int4 modules")
    types = ", ".join(f"{t} x{n}" for t, n in sorted(dequantized.items()))
    parts.append(f"{sum(dequantized.values())} tensors dequantized ({types or 'none'})")
    return ", ".join(parts)


def _log_requantized(quant: str, floats: Counter) -> None:
    types = ", ".join(f"{t} x{n}" for t, n in sorted(floats.items()))
    twice = set(floats) - FLOAT_TYPES
    message = "--quant %s: %d linear weights (%s) dequantized at load, then quantized to %s"
    if twice:  # the file's quantization error, then ours
        message += " (no exact form in that format: quantized twice)"
    (log.warning if twice else log.info)(message, quant, sum(floats.values()), types, quant)


def load_tokenizer(model: str):
    if not (Path(model) / "tokenizer.json").is_file():
        log.warning("%s has no tokenizer.json: only token-id prompts are accepted", model)
        return None
    from agentcpu.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(model)
