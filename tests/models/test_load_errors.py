"""Bad checkpoints and bad requests give typed errors that name the problem."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from agentcpu.engine.llm_engine import LLMEngine
from agentcpu.engine.sampling_params import SamplingParams
from agentcpu.errors import (
    ContextLengthError,
    InvalidRequestError,
    ModelLoadError,
    UnsupportedModelError,
)
from agentcpu.models.loading import resolve_engine_config


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _engine(path):
    return LLMEngine(resolve_engine_config(str(path), dtype="float32", max_model_len=128, kv_cache_gb=0.01))


def _rewrite_weights(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_weight_is_named(checkpoint_dir, tmp_path):
    path = _copy(checkpoint_dir("qwen2"), tmp_path / "m")
    _rewrite_weights(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        _engine(path)


def test_wrong_shape_is_named(checkpoint_dir, tmp_path):
    path = _copy(checkpoint_dir("qwen2"), tmp_path / "m")

    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 128)

    _rewrite_weights(path, shrink)
    with pytest.raises(ModelLoadError, match=r"k_proj\.weight.*\(8, 128\).*\(32, 128\)"):
        _engine(path)


def test_unexpected_tensor_is_named(checkpoint_dir, tmp_path):
    path = _copy(checkpoint_dir("llama"), tmp_path / "m")
    _rewrite_weights(path, lambda t: t.update({"model.extra.weight": torch.zeros(2)}))
    with pytest.raises(ModelLoadError, match=r"model\.extra\.weight"):
        _engine(path)


def test_unknown_model_type(checkpoint_dir, tmp_path):
    path = _copy(checkpoint_dir("llama"), tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="gpt_neox"):
        _engine(path)


def test_missing_files(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        _engine(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        _engine(tmp_path / "empty")


def test_missing_shard_is_named(checkpoint_dir, tmp_path):
    path = _copy(checkpoint_dir("qwen2", max_shard_size="200KB"), tmp_path / "m")
    victim = sorted(path.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(ModelLoadError, match=victim.name):
        _engine(path)


def test_bad_requests(checkpoint_dir):
    engine = _engine(checkpoint_dir("llama"))
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request([], SamplingParams(max_tokens=4))
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        engine.add_request([1, 100000], SamplingParams(max_tokens=4))
    with pytest.raises(ContextLengthError, match="120 tokens.*16 output.*128"):
        engine.add_request([1] * 120, SamplingParams(max_tokens=16))
    with pytest.raises(InvalidRequestError, match="top_p"):
        SamplingParams(top_p=0)
    assert not engine.has_unfinished()
