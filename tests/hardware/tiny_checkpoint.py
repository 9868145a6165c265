"""A tiny Llama-shaped safetensors checkpoint written from known tensors, so tests can
check the header-only footprint against sums computed from the tensors themselves."""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

VOCAB, HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 64, 16, 32, 2, 4, 2
HEAD_DIM = HIDDEN // HEADS


def _layer_tensors(layer: int) -> dict[str, torch.Tensor]:
    prefix = f"model.layers.{layer}"
    kv = KV_HEADS * HEAD_DIM
    return {
        f"{prefix}.self_attn.q_proj.weight": torch.randn(HIDDEN, HIDDEN),
        f"{prefix}.self_attn.q_proj.bias": torch.randn(HIDDEN),
        f"{prefix}.self_attn.k_proj.weight": torch.randn(kv, HIDDEN),
        f"{prefix}.self_attn.v_proj.weight": torch.randn(kv, HIDDEN),
        f"{prefix}.self_attn.o_proj.weight": torch.randn(HIDDEN, HIDDEN),
        f"{prefix}.mlp.gate_proj.weight": torch.randn(INTER, HIDDEN),
        f"{prefix}.mlp.up_proj.weight": torch.randn(INTER, HIDDEN),
        f"{prefix}.mlp.down_proj.weight": torch.randn(HIDDEN, INTER),
        f"{prefix}.input_layernorm.weight": torch.ones(HIDDEN),
    }


def _tensors(tied: bool) -> dict[str, torch.Tensor]:
    tensors = {"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN)}
    for layer in range(LAYERS):
        tensors |= _layer_tensors(layer)
    tensors["model.norm.weight"] = torch.ones(HIDDEN)
    if not tied:
        tensors["lm_head.weight"] = torch.randn(VOCAB, HIDDEN)
    return {name: t.to(torch.bfloat16) for name, t in tensors.items()}


def _config(tied: bool) -> dict:
    return {
        "tie_word_embeddings": tied,
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
    }


def write_tiny_checkpoint(path: Path, tied: bool, shards: int = 1) -> dict[str, torch.Tensor]:
    tensors = _tensors(tied)
    names = sorted(tensors)
    for shard in range(shards):
        part = {name: tensors[name] for name in names[shard::shards]}
        save_file(part, str(path / f"model-{shard:05d}-of-{shards:05d}.safetensors"))
    (path / "config.json").write_text(json.dumps(_config(tied)))
    return tensors
