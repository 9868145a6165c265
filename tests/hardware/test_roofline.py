import math

import pytest

from agentcpu.errors import InvalidRequestError, ModelLoadError
from agentcpu.hardware.roofline import (
    SCALE_BYTES,
    model_footprint,
    quantized_footprint,
    roofline,
    roofline_for_quant,
)
from tests.hardware.tiny_checkpoint import (
    HEAD_DIM,
    HIDDEN,
    KV_HEADS,
    LAYERS,
    VOCAB,
    write_tiny_checkpoint,
)


def _numel_bytes(tensors, keep) -> tuple[int, int]:
    chosen = [t for name, t in tensors.items() if keep(name)]
    return sum(t.numel() for t in chosen), sum(t.numel() * t.element_size() for t in chosen)


@pytest.mark.parametrize("shards", [1, 2])
def test_tied_footprint_reads_embedding_once_as_lm_head(tmp_path, shards):
    tensors = write_tiny_checkpoint(tmp_path, tied=True, shards=shards)
    footprint = model_footprint(tmp_path)
    all_params, all_bytes = _numel_bytes(tensors, lambda name: True)
    assert footprint.tied_embeddings
    assert (footprint.total_params, footprint.total_bytes) == (all_params, all_bytes)
    assert (footprint.decode_params, footprint.decode_bytes) == (all_params, all_bytes)
    assert footprint.lm_head_params == VOCAB * HIDDEN
    assert footprint.weight_dtype == "BF16" and footprint.weight_bits == 16


def test_untied_footprint_skips_input_embedding(tmp_path):
    tensors = write_tiny_checkpoint(tmp_path, tied=False)
    footprint = model_footprint(tmp_path)
    expected = _numel_bytes(tensors, lambda name: "embed_tokens" not in name)
    assert not footprint.tied_embeddings
    assert (footprint.decode_params, footprint.decode_bytes) == expected
    assert footprint.total_params == sum(t.numel() for t in tensors.values())
    assert footprint.embedding_params == footprint.lm_head_params == VOCAB * HIDDEN


def test_footprint_splits_linear_and_other(tmp_path):
    tensors = write_tiny_checkpoint(tmp_path, tied=False)
    footprint = model_footprint(tmp_path)
    linear = _numel_bytes(
        tensors, lambda name: tensors[name].dim() == 2 and "embed" not in name and "lm_head" not in name
    )
    other = _numel_bytes(tensors, lambda name: tensors[name].dim() == 1)
    assert (footprint.linear_params, footprint.linear_bytes) == linear
    assert (footprint.other_params, footprint.other_bytes) == other
    assert footprint.kv_bytes_per_token == LAYERS * 2 * KV_HEADS * HEAD_DIM * 2


def test_single_file_and_missing_paths(tmp_path):
    write_tiny_checkpoint(tmp_path, tied=True)
    single = model_footprint(tmp_path / "model-00000-of-00001.safetensors")
    assert single == model_footprint(tmp_path)
    with pytest.raises(ModelLoadError):
        model_footprint(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError):
        model_footprint(empty)


def test_malformed_header_raises(tmp_path):
    (tmp_path / "model.safetensors").write_bytes((2**40).to_bytes(8, "little") + b"{}")
    with pytest.raises(ModelLoadError):
        model_footprint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes((4).to_bytes(8, "little") + b"nope")
    with pytest.raises(ModelLoadError):
        model_footprint(tmp_path)


def test_roofline_arithmetic(tmp_path):
    write_tiny_checkpoint(tmp_path, tied=True)
    footprint = model_footprint(tmp_path)
    limits = roofline(footprint, bandwidth_gbs=20.0, flops=1e12)
    assert limits["decode_tok_s"] == pytest.approx(20e9 / footprint.decode_bytes)
    assert limits["decode_step_ms"] == pytest.approx(1e3 * footprint.decode_bytes / 20e9)
    assert limits["prefill_tok_s"] == pytest.approx(1e12 / (2 * footprint.decode_params))
    with_kv = roofline(footprint, 20.0, 1e12, context_tokens=100)
    kv = 100 * footprint.kv_bytes_per_token
    assert with_kv["decode_tok_s"] == pytest.approx(20e9 / (footprint.decode_bytes + kv))


def test_roofline_rejects_bad_limits(tmp_path):
    write_tiny_checkpoint(tmp_path, tied=True)
    footprint = model_footprint(tmp_path)
    for bandwidth, flops in [(0.0, 1e12), (10.0, -1.0)]:
        with pytest.raises(InvalidRequestError):
            roofline(footprint, bandwidth, flops)


def test_quantized_footprint_shrinks_linear_only(tmp_path):
    write_tiny_checkpoint(tmp_path, tied=False)
    footprint = model_footprint(tmp_path)
    int4 = quantized_footprint(footprint, bits=4, group_size=16)
    scales = math.ceil(footprint.linear_params / 16)
    assert int4.linear_bytes == footprint.linear_params // 2 + scales * SCALE_BYTES
    assert int4.lm_head_bytes == footprint.lm_head_bytes
    assert int4.other_bytes == footprint.other_bytes
    assert int4.decode_params == footprint.decode_params
    int8 = quantized_footprint(footprint, bits=8, group_size=None, lm_head_bits=8)
    assert int8.linear_bytes == footprint.linear_params + footprint.linear_rows * SCALE_BYTES
    assert int8.lm_head_bytes == footprint.lm_head_params + VOCAB * SCALE_BYTES


def test_roofline_for_quant_matches_quantized_footprint(tmp_path):
    write_tiny_checkpoint(tmp_path, tied=True)
    footprint = model_footprint(tmp_path)
    limits = roofline_for_quant(footprint, 8, 32, bandwidth_gbs=10.0, flops=1e12)
    bytes_int8 = quantized_footprint(footprint, 8, 32).decode_bytes
    assert limits["decode_tok_s"] == pytest.approx(10e9 / bytes_int8)
    assert limits["decode_tok_s"] > roofline(footprint, 10.0, 1e12)["decode_tok_s"]
    with pytest.raises(InvalidRequestError):
        roofline_for_quant(footprint, 3, 32, 10.0, 1e12)
    with pytest.raises(InvalidRequestError):
        quantized_footprint(footprint, 4, 0)


def test_gguf_footprint_counts_stored_block_bytes():
    from gguf import GGMLQuantizationType

    from agentcpu.loaders.gguf_file import GGUFModelFile
    from tests.loaders.gguf_cases import FIXTURES

    path = next((FIXTURES / "qwen2-bpe").glob("*q8_0*.gguf"))
    gguf = GGUFModelFile(path)
    fp = model_footprint(path)
    assert fp.total_bytes == sum(t.n_bytes for t in gguf.tensors.values())
    head = gguf.tensors.get("output.weight") or gguf.tensors["token_embd.weight"]
    assert fp.lm_head_bytes == head.n_bytes
    q8 = [t for n, t in gguf.tensors.items() if t.ggml_type == GGMLQuantizationType.Q8_0 and n.startswith("blk.")]
    assert q8 and fp.weight_dtype == "Q8_0"
    assert fp.weight_bits == pytest.approx(8.5)  # 34 bytes per 32 weights
