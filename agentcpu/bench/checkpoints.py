"""Random-weight Hugging Face checkpoints of real model shapes (BENCH.md "Model shapes").

`make_random_checkpoint` writes `config.json`, `generation_config.json`, tokenizer files
and `model.safetensors` (sharded with an index when large) laid out as the published
Qwen2.5 / Llama 3.2 checkpoints are, without importing transformers, so every engine we
compare against (vLLM, llama.cpp's converter, transformers) loads the same files.

    python -m agentcpu.bench.checkpoints --shape qwen2.5-0.5b --out .bench/qwen2.5-0.5b
"""

from __future__ import annotations

import argparse
import json
import sys
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from agentcpu.bench.synthetic_tokenizer import write_tokenizer_files
from agentcpu.errors import AgentCPUError

WEIGHT_STD = 0.02
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
GENERATION_CHUNK_ELEMENTS = 16 * 1024**2  # fp32 scratch per chunk: 64 MiB
# The release whose config.json layout we reproduce: the converter venv of llama.cpp pins
# it, and transformers 5 / vLLM read it (transformers 5 itself writes `rope_parameters`,
# which transformers 4.x silently ignores).
TRANSFORMERS_VERSION = "4.57.6"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SHARD_NAME = "model-{:05d}-of-{:05d}.safetensors"
INDEX_NAME = "model.safetensors.index.json"


class CheckpointError(AgentCPUError, ValueError):
    """An unknown shape, dtype or shard size was asked for."""


@dataclass(frozen=True)
class ModelShape:
    name: str
    model_type: str  # "qwen2" or "llama"
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    first_special_id: int  # where the published tokenizer puts its special tokens
    tie_word_embeddings: bool = True
    rope_scaling: tuple[tuple[str, float | int | str], ...] | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def attention_bias(self) -> bool:
        return self.model_type == "qwen2"

    def special_tokens(self) -> dict[str, int]:
        names = SPECIAL_TOKENS[self.model_type]
        return {text: self.first_special_id + offset for offset, text in enumerate(names)}

    def tensor_shapes(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """HF tensor names and shapes, in the order the checkpoint stores them."""
        hidden, q_dim = self.hidden_size, self.num_heads * self.head_dim
        kv_dim = self.num_kv_heads * self.head_dim
        yield "model.embed_tokens.weight", (self.vocab_size, hidden)
        for i in range(self.num_layers):
            prefix = f"model.layers.{i}"
            for proj, rows in (("q", q_dim), ("k", kv_dim), ("v", kv_dim)):
                yield f"{prefix}.self_attn.{proj}_proj.weight", (rows, hidden)
                if self.attention_bias:
                    yield f"{prefix}.self_attn.{proj}_proj.bias", (rows,)
            yield f"{prefix}.self_attn.o_proj.weight", (hidden, q_dim)
            yield f"{prefix}.mlp.gate_proj.weight", (self.intermediate_size, hidden)
            yield f"{prefix}.mlp.up_proj.weight", (self.intermediate_size, hidden)
            yield f"{prefix}.mlp.down_proj.weight", (hidden, self.intermediate_size)
            yield f"{prefix}.input_layernorm.weight", (hidden,)
            yield f"{prefix}.post_attention_layernorm.weight", (hidden,)
        yield "model.norm.weight", (hidden,)
        if not self.tie_word_embeddings:
            yield "lm_head.weight", (self.vocab_size, hidden)

    def num_parameters(self) -> int:
        return sum(_numel(shape) for _, shape in self.tensor_shapes())


SPECIAL_TOKENS = {
    "qwen2": ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    "llama": ("<|begin_of_text|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"),
}
ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
LLAMA3_ROPE_SCALING = (
    ("factor", 32.0),
    ("high_freq_factor", 4.0),
    ("low_freq_factor", 1.0),
    ("original_max_position_embeddings", 8192),
    ("rope_type", "llama3"),
)

SHAPES = {
    shape.name: shape
    for shape in (
        ModelShape(
            name="qwen2.5-0.5b",
            model_type="qwen2",
            hidden_size=896,
            num_layers=24,
            num_heads=14,
            num_kv_heads=2,
            intermediate_size=4864,
            vocab_size=151936,
            max_position_embeddings=32768,
            rope_theta=1e6,
            rms_norm_eps=1e-6,
            first_special_id=151643,
        ),
        ModelShape(
            name="llama3.2-1b",
            model_type="llama",
            hidden_size=2048,
            num_layers=16,
            num_heads=32,
            num_kv_heads=8,
            intermediate_size=8192,
            vocab_size=128256,
            max_position_embeddings=131072,
            rope_theta=500000.0,
            rms_norm_eps=1e-5,
            first_special_id=128000,
            rope_scaling=LLAMA3_ROPE_SCALING,
        ),
        ModelShape(
            name="tiny-qwen2",
            model_type="qwen2",
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=128,
            vocab_size=1024,
            max_position_embeddings=2048,
            rope_theta=1e6,
            rms_norm_eps=1e-6,
            first_special_id=1000,
        ),
        ModelShape(
            name="tiny-llama",
            model_type="llama",
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=128,
            vocab_size=1024,
            max_position_embeddings=2048,
            rope_theta=500000.0,
            rms_norm_eps=1e-5,
            first_special_id=1000,
            rope_scaling=(
                ("factor", 32.0),
                ("high_freq_factor", 4.0),
                ("low_freq_factor", 1.0),
                ("original_max_position_embeddings", 256),
                ("rope_type", "llama3"),
            ),
        ),
    )
}


def get_shape(name: str) -> ModelShape:
    if name not in SHAPES:
        raise CheckpointError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    return SHAPES[name]


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


# ---- config.json / generation_config.json ----


def _token_ids(shape: ModelShape) -> tuple[int, int, int]:
    """(bos, eos, pad) ids as the published configs set them."""
    special = shape.special_tokens()
    bos = special["<|begin_of_text|>" if shape.model_type == "llama" else "<|endoftext|>"]
    return bos, special["<|im_end|>"], special["<|endoftext|>"]


def hf_config(shape: ModelShape, dtype: str) -> dict:
    bos, eos, _ = _token_ids(shape)
    config: dict[str, object] = {
        "architectures": [ARCHITECTURES[shape.model_type]],
        "attention_dropout": 0.0,
        "bos_token_id": bos,
        "dtype": dtype,
        "eos_token_id": eos,
        "hidden_act": "silu",
        "hidden_size": shape.hidden_size,
        "initializer_range": WEIGHT_STD,
        "intermediate_size": shape.intermediate_size,
        "max_position_embeddings": shape.max_position_embeddings,
        "model_type": shape.model_type,
        "num_attention_heads": shape.num_heads,
        "num_hidden_layers": shape.num_layers,
        "num_key_value_heads": shape.num_kv_heads,
        "rms_norm_eps": shape.rms_norm_eps,
        "rope_scaling": dict(shape.rope_scaling) if shape.rope_scaling else None,
        "rope_theta": shape.rope_theta,
        "tie_word_embeddings": shape.tie_word_embeddings,
        "transformers_version": TRANSFORMERS_VERSION,
        "use_cache": True,
        "vocab_size": shape.vocab_size,
    }
    config.update(FAMILY_CONFIG[shape.model_type](shape))
    return dict(sorted(config.items()))


def _qwen2_config(shape: ModelShape) -> dict[str, object]:
    return {
        "layer_types": ["full_attention"] * shape.num_layers,
        "max_window_layers": shape.num_layers,
        "sliding_window": None,
        "use_sliding_window": False,
    }


def _llama_config(shape: ModelShape) -> dict[str, object]:
    return {
        "attention_bias": False,
        "head_dim": shape.head_dim,
        "mlp_bias": False,
        "pretraining_tp": 1,
    }


FAMILY_CONFIG = {"qwen2": _qwen2_config, "llama": _llama_config}


def generation_config(shape: ModelShape) -> dict:
    bos, eos, pad = _token_ids(shape)
    return {
        "bos_token_id": bos,
        "eos_token_id": [eos, pad],
        "pad_token_id": pad,
        "transformers_version": TRANSFORMERS_VERSION,
    }


# ---- weights ----


def _random_tensor(
    name: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype
) -> torch.Tensor:
    """N(0, WEIGHT_STD) (norm weights: ones), drawn in row chunks to bound fp32 scratch.

    Each tensor has its own generator seeded from its name, so values do not depend on
    sharding or on which tensors come before it.
    """
    if name.endswith("layernorm.weight") or name == "model.norm.weight":
        return torch.ones(shape, dtype=dtype)
    out = torch.empty(shape, dtype=dtype)
    flat = out.view(-1, shape[-1])
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    rows_per_chunk = max(1, GENERATION_CHUNK_ELEMENTS // shape[-1])
    for start in range(0, flat.shape[0], rows_per_chunk):
        rows = min(rows_per_chunk, flat.shape[0] - start)
        chunk = torch.randn(rows, shape[-1], generator=generator).mul_(WEIGHT_STD)
        flat[start : start + rows].copy_(chunk)
    return out


def plan_shards(
    specs: Sequence[tuple[str, tuple[int, ...]]], bytes_per_element: int, max_shard_bytes: int
) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy packing in checkpoint order; a tensor larger than the limit gets its own shard."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    shard_bytes = 0
    for name, shape in specs:
        size = _numel(shape) * bytes_per_element
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append((name, shape))
        shard_bytes += size
    return shards


def _write_weights(
    shape: ModelShape, out_dir: Path, seed: int, dtype: torch.dtype, max_shard_bytes: int
) -> None:
    for stale in [*out_dir.glob("model*.safetensors"), out_dir / INDEX_NAME]:
        stale.unlink(missing_ok=True)
    element_size = torch.empty((), dtype=dtype).element_size()
    shards = plan_shards(list(shape.tensor_shapes()), element_size, max_shard_bytes)
    weight_map: dict[str, str] = {}
    for index, specs in enumerate(shards, start=1):
        filename = (
            "model.safetensors" if len(shards) == 1 else SHARD_NAME.format(index, len(shards))
        )
        # One shard in memory at a time (safetensors serializes a dict of tensors).
        tensors = {name: _random_tensor(name, dims, seed, dtype) for name, dims in specs}
        save_file(tensors, str(out_dir / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, filename))
        del tensors
    if len(shards) > 1:
        total = sum(_numel(dims) * element_size for _, dims in shape.tensor_shapes())
        index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / INDEX_NAME).write_text(json.dumps(index_json, indent=2) + "\n")


# ---- public entry points ----


def make_random_checkpoint(
    shape: str,
    out_dir: str | Path,
    seed: int = 0,
    dtype: str = "bfloat16",
    max_shard_bytes: int | None = None,
) -> Path:
    """Write a random-weight HF checkpoint of the named shape into `out_dir`; return it."""
    model_shape = get_shape(shape)
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise CheckpointError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", hf_config(model_shape, dtype))
    _write_json(out / "generation_config.json", generation_config(model_shape))
    _, eos, pad = _token_ids(model_shape)
    bos_text = "<|begin_of_text|>" if model_shape.model_type == "llama" else None
    write_tokenizer_files(
        out,
        model_shape.vocab_size,
        model_shape.special_tokens(),
        model_shape.model_type,
        bos=bos_text,
        eos="<|im_end|>",
        pad="<|endoftext|>",
    )
    _write_weights(
        model_shape, out, seed, DTYPES[dtype], max_shard_bytes or DEFAULT_MAX_SHARD_BYTES
    )
    return out


def _write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n")


def parse_byte_size(text: str) -> int:
    """'500MB', '2GiB', '123' -> bytes."""
    units = {"kib": 1024, "mib": 1024**2, "gib": 1024**3, "kb": 10**3, "mb": 10**6, "gb": 10**9}
    lowered = text.strip().lower()
    for suffix, factor in units.items():
        if lowered.endswith(suffix):
            return int(float(lowered[: -len(suffix)]) * factor)
    try:
        return int(lowered.rstrip("b"))
    except ValueError:
        raise CheckpointError(f"cannot read byte size {text!r} (try 500MB or 2GiB)") from None


def main_make_checkpoint(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m agentcpu.bench.checkpoints",
        description="Write a random-weight Hugging Face checkpoint of a named model shape.",
    )
    parser.add_argument("--shape", required=True, choices=sorted(SHAPES))
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument(
        "--max-shard-size",
        type=parse_byte_size,
        default=None,
        help="shard when larger than this (default 2GiB), e.g. 500MB",
    )
    args = parser.parse_args(argv)
    shape = get_shape(args.shape)
    out = make_random_checkpoint(args.shape, args.out, args.seed, args.dtype, args.max_shard_size)
    print(f"wrote {shape.name} ({shape.num_parameters():,} params, {args.dtype}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main_make_checkpoint())
