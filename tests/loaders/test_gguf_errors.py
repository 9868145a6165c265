"""Bad GGUF files fail with a typed error that says what is wrong."""

from __future__ import annotations

import logging
import shutil

import pytest

from agentcpu.errors import ModelLoadError, UnsupportedModelError
from agentcpu.loaders.gguf_file import GGUFModelFile
from agentcpu.loaders.gguf_tokenizer import tokenizer_from_gguf
from agentcpu.models.loading import resolve_engine_config
from tests.loaders.gguf_cases import engine, gguf_path

SOURCE = gguf_path("qwen2-bpe", "q8_0")


def _patched(tmp_path, old: bytes, new: bytes, count: int = -1):
    """A copy of SOURCE with same-length byte strings replaced (the file stays valid)."""
    assert len(old) == len(new)
    data = SOURCE.read_bytes()
    assert old in data
    path = tmp_path / "patched.gguf"
    path.write_bytes(data.replace(old, new, count))
    return path


@pytest.mark.parametrize("keep_fraction", [0.0005, 0.01, 0.5, 0.999])
def test_truncated_file(tmp_path, keep_fraction):
    data = SOURCE.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: max(1, int(len(data) * keep_fraction))])
    with pytest.raises(
        ModelLoadError, match="cannot read GGUF file .*(truncated|end of the file|past the end)"
    ):
        resolve_engine_config(str(path))


def test_empty_file(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty"):
        resolve_engine_config(str(path))


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04" + SOURCE.read_bytes()[4:])
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        resolve_engine_config(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_engine_config(str(tmp_path / "nothing.gguf"))


def test_unsupported_architecture(tmp_path):
    path = _patched(tmp_path, b"qwen2", b"bert2")
    with pytest.raises(UnsupportedModelError, match="architecture 'bert2' is not supported"):
        resolve_engine_config(str(path))


def test_missing_metadata_key_is_named(tmp_path):
    path = _patched(tmp_path, b"qwen2.block_count", b"qwen2.block_cnt__")
    with pytest.raises(ModelLoadError, match="qwen2.block_count"):
        resolve_engine_config(str(path))


def test_unknown_tensor_is_named(tmp_path):
    path = _patched(tmp_path, b"blk.1.ffn_up.weight", b"blk.1.ffn_xx.weight")
    with pytest.raises(ModelLoadError, match="blk.1.ffn_xx.weight"):
        engine(path)


def test_corrupt_tensor_type(tmp_path):
    data = bytearray(SOURCE.read_bytes())
    name = b"output_norm.weight"
    at = data.index(name) + len(name)
    n_dims = int.from_bytes(data[at : at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    data[type_at : type_at + 4] = (999).to_bytes(4, "little")
    path = tmp_path / "badtype.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="unknown ggml type 999"):
        GGUFModelFile(path)


def _string_value(key: str, value: str) -> bytes:
    """How a string-valued metadata entry is laid out: key, type 8, length, bytes."""
    return (
        key.encode() + (8).to_bytes(4, "little") + len(value).to_bytes(8, "little") + value.encode()
    )


def test_unknown_pre_tokenizer_warns_and_loads(tmp_path, caplog):
    key = "tokenizer.ggml.pre"
    path = _patched(tmp_path, _string_value(key, "qwen2"), _string_value(key, "qwenX"))
    gguf = GGUFModelFile(path)
    assert gguf.get(key) == "qwenX"
    with caplog.at_level(logging.WARNING):
        tokenizer = tokenizer_from_gguf(gguf)
    assert tokenizer.decode(tokenizer.encode("hello world")) == "hello world"
    assert "unknown pre-tokenizer 'qwenX'" in caplog.text


def test_unsupported_tokenizer_model(tmp_path):
    key = "tokenizer.ggml.model"
    path = _patched(tmp_path, _string_value(key, "gpt2"), _string_value(key, "bert"))
    with pytest.raises(ModelLoadError, match="tokenizer model 'bert' is not supported"):
        tokenizer_from_gguf(GGUFModelFile(path))


def test_a_directory_named_gguf_is_a_checkpoint_directory(tmp_path):
    directory = tmp_path / "model.gguf"
    shutil.copytree(SOURCE.parent / "hf", directory)
    assert resolve_engine_config(str(directory)).model_config.model_type == "qwen2"


def _with_metadata(**changes):
    """The Q8_0 fixture's header with metadata entries changed (tensors kept)."""
    gguf = GGUFModelFile(SOURCE)
    gguf.metadata = {**gguf.metadata, **changes}
    return gguf


def test_yarn_and_linear_rope_scaling_map_to_hugging_face_names():
    yarn = _with_metadata(
        **{
            "qwen2.rope.scaling.type": "yarn",
            "qwen2.rope.scaling.factor": 4.0,
            "qwen2.rope.scaling.original_context_length": 32768,
        },
    )
    assert yarn.model_config().rope_scaling == {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 32768,
    }
    linear = _with_metadata(**{"qwen2.rope.scale_linear": 2.0})
    assert linear.model_config().rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_unsupported_rope_scaling_and_partial_rotary():
    longrope = _with_metadata(
        **{"qwen2.rope.scaling.type": "longrope", "qwen2.rope.scaling.factor": 4.0}
    )
    with pytest.raises(UnsupportedModelError, match="longrope"):
        longrope.model_config()
    partial = _with_metadata(**{"qwen2.rope.dimension_count": 8})
    with pytest.raises(UnsupportedModelError, match="partial rotary"):
        partial.model_config()


def test_malformed_metadata_value():
    bad = _with_metadata(**{"qwen2.block_count": "two"})
    with pytest.raises(ModelLoadError, match="malformed metadata"):
        bad.model_config()
