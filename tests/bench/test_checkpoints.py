"""Random-weight checkpoints load in transformers exactly as published checkpoints do."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from agentcpu.bench.checkpoints import (
    SHAPES,
    CheckpointError,
    main_make_checkpoint,
    make_random_checkpoint,
    parse_byte_size,
    plan_shards,
)

transformers = pytest.importorskip("transformers")
TINY_SHAPES = ["tiny-qwen2", "tiny-llama"]


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("random-checkpoints")
    return {name: make_random_checkpoint(name, root / name, seed=7) for name in TINY_SHAPES}


@pytest.mark.parametrize("name", TINY_SHAPES)
def test_tiny_checkpoint_loads_without_missing_or_unexpected_keys(tiny_checkpoints, name):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        tiny_checkpoints[name], output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"] and not info["error_msgs"]
    assert model.dtype == torch.bfloat16
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    logits = model(ids).logits
    assert logits.shape == (1, 5, SHAPES[name].vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", TINY_SHAPES)
def test_config_reads_back_in_transformers(tiny_checkpoints, name):
    shape = SHAPES[name]
    config = transformers.AutoConfig.from_pretrained(tiny_checkpoints[name])
    assert config.model_type == shape.model_type
    assert config.num_key_value_heads == shape.num_kv_heads
    assert config.tie_word_embeddings
    rope = getattr(config, "rope_parameters", None) or {"rope_theta": config.rope_theta}
    assert rope["rope_theta"] == shape.rope_theta
    if shape.rope_scaling:
        assert rope["rope_type"] == "llama3" and rope["factor"] == 32.0


@pytest.mark.parametrize("name", TINY_SHAPES)
def test_weights_have_expected_statistics(tiny_checkpoints, name):
    tensors = load_file(tiny_checkpoints[name] / "model.safetensors")
    assert set(tensors) == {n for n, _ in SHAPES[name].tensor_shapes()}
    assert "lm_head.weight" not in tensors
    assert torch.all(tensors["model.norm.weight"] == 1)
    std = tensors["model.embed_tokens.weight"].float().std().item()
    assert 0.018 < std < 0.022
    if SHAPES[name].model_type == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in tensors


@pytest.mark.parametrize("name", TINY_SHAPES)
def test_tokenizer_covers_vocab_and_renders_chatml(tiny_checkpoints, name):
    from tokenizers import Tokenizer

    path = tiny_checkpoints[name]
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    assert len(tokenizer) == config["vocab_size"]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == config["eos_token_id"]
    tokenizer.decode(list(range(config["vocab_size"])))  # every id a random model emits decodes
    text = "Hello, world! 12345 déjà vu 🦊\n<|im_start|>user\nhi<|im_end|>"
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    assert tokenizer(text).input_ids == raw.encode(text).ids
    assert tokenizer.decode(raw.encode(text).ids) == text
    chat = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert chat == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_sharded_checkpoint_matches_single_file(tmp_path, tiny_checkpoints):
    sharded = make_random_checkpoint(
        "tiny-llama", tmp_path / "sharded", seed=7, max_shard_bytes=50_000
    )
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and not (sharded / "model.safetensors").exists()
    merged = {}
    for filename in files:
        merged.update(load_file(sharded / filename))
    single = load_file(tiny_checkpoints["tiny-llama"] / "model.safetensors")
    assert merged.keys() == single.keys()
    assert all(torch.equal(merged[k], single[k]) for k in single)
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in single.values())
    _, info = transformers.AutoModelForCausalLM.from_pretrained(sharded, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_published_shapes_have_published_parameter_counts():
    assert round(SHAPES["qwen2.5-0.5b"].num_parameters() / 1e6) == 494
    assert round(SHAPES["llama3.2-1b"].num_parameters() / 1e6) == 1236


def test_plan_shards_packs_greedily_and_isolates_oversized_tensors():
    specs = [("a", (10,)), ("b", (10,)), ("c", (100,)), ("d", (5,))]
    shards = plan_shards(specs, bytes_per_element=1, max_shard_bytes=25)
    assert [[name for name, _ in shard] for shard in shards] == [["a", "b"], ["c"], ["d"]]


def test_bad_arguments_raise_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError):
        make_random_checkpoint("gpt-7", tmp_path)
    with pytest.raises(CheckpointError):
        make_random_checkpoint("tiny-qwen2", tmp_path, dtype="int3")
    with pytest.raises(CheckpointError):
        parse_byte_size("lots")
    assert parse_byte_size("2GiB") == 2 * 1024**3 and parse_byte_size("500MB") == 500 * 10**6


def test_cli_writes_checkpoint_without_importing_transformers(tmp_path):
    assert main_make_checkpoint(["--shape", "tiny-qwen2", "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "model.safetensors").exists()
    probe = (
        "import sys; from agentcpu.bench.checkpoints import main_make_checkpoint; "
        f"main_make_checkpoint(['--shape', 'tiny-llama', '--out', {str(tmp_path / 'b')!r}]); "
        "assert 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True)
