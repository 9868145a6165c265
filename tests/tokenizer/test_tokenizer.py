"""Tokenizer loading, special tokens, and encode/decode parity with transformers."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer

from agentcpu.errors import InvalidRequestError, ModelLoadError
from agentcpu.tokenizer import Tokenizer
from tests.tokenizer.fixtures import KINDS, make_bpe_tokenizer_dir

PARITY = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
SPECIAL_STRINGS = ["<|im_end|>", "<|im_start|>", "<|begin_of_text|>", "<|eot_id|>", "<s>", "</s>",
                   "<tool_call>", "<unk>"]
texts = st.lists(
    st.one_of(st.text(max_size=30), st.sampled_from(SPECIAL_STRINGS), st.sampled_from([" ", "\n"])),
    max_size=8,
).map("".join)


@pytest.mark.parametrize("kind", KINDS)
@PARITY
@given(text=texts)
def test_encode_decode_match_transformers(tokenizers_by_kind, references, kind, text):
    ours, ref = tokenizers_by_kind[kind], references[kind]
    ids = ours.encode(text)
    assert ids == ref.encode(text, add_special_tokens=False)
    assert ours.encode(text, add_special_tokens=True) == ref(text)["input_ids"]
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("kind", KINDS)
@PARITY
@given(data=st.data())
def test_decode_of_random_ids_matches_transformers(tokenizers_by_kind, references, kind, data):
    ours, ref = tokenizers_by_kind[kind], references[kind]
    ids = data.draw(st.lists(st.integers(0, ours.vocab_size - 1), max_size=20))
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("kind", KINDS)
def test_vocab_and_special_tokens_match_transformers(tokenizers_by_kind, references, kind):
    ours, ref = tokenizers_by_kind[kind], references[kind]
    assert ours.vocab_size == len(ref)
    assert ours.bos_token_id == ref.bos_token_id
    assert ours.eos_token_id == ref.eos_token_id
    assert ours.pad_token_id == ref.pad_token_id
    assert set(ref.all_special_ids) <= ours.special_token_ids
    for token, i in list(ref.get_vocab().items())[:50]:
        assert ours.token_to_id(token) == i
        assert ours.id_to_token(i) == token


def test_bos_comes_from_the_post_processor(tokenizers_by_kind):
    llama3, qwen, metaspace = (tokenizers_by_kind[k] for k in ("llama3", "qwen2.5", "metaspace"))
    assert llama3.encode("hi", add_special_tokens=True)[0] == llama3.bos_token_id
    assert llama3.encode("hi")[0] != llama3.bos_token_id
    assert metaspace.encode("hi", add_special_tokens=True)[0] == metaspace.bos_token_id == 1
    assert qwen.bos_token_id is None
    assert qwen.encode("hi", add_special_tokens=True) == qwen.encode("hi")


def test_add_bos_token_applies_without_a_post_processor(tokenizer_dirs):
    hf = HFTokenizer.from_file(str(tokenizer_dirs["metaspace"] / "tokenizer.json"))
    hf.post_processor = None
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "add_eos_token": True}
    tok = Tokenizer.from_parts(hf, config)
    plain = tok.encode("hello")
    assert tok.encode("hello", add_special_tokens=True) == [1, *plain, 2]
    no_bos = Tokenizer.from_parts(hf, {**config, "add_bos_token": False, "add_eos_token": False})
    assert no_bos.encode("hello", add_special_tokens=True) == plain


def test_eos_ids_union_config_and_generation_config(tokenizers_by_kind):
    qwen, llama3 = tokenizers_by_kind["qwen2.5"], tokenizers_by_kind["llama3"]
    assert qwen.eos_token_ids == {qwen.token_to_id("<|im_end|>"), qwen.token_to_id("<|endoftext|>")}
    assert qwen.eos_token_id == qwen.token_to_id("<|im_end|>")
    assert llama3.eos_token_ids == {
        llama3.token_to_id(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")
    }
    assert isinstance(llama3.eos_token_ids, frozenset)
    assert tokenizers_by_kind["metaspace"].eos_token_ids == {2}


def test_generation_config_single_int_and_fallback_ids(tokenizer_dirs):
    hf = HFTokenizer.from_file(str(tokenizer_dirs["qwen2.5"] / "tokenizer.json"))
    endoftext = hf.token_to_id("<|endoftext|>")
    tok = Tokenizer.from_parts(hf, {}, {"eos_token_id": endoftext, "bos_token_id": endoftext})
    assert tok.eos_token_ids == {endoftext} and tok.eos_token_id == endoftext
    assert tok.bos_token_id == endoftext
    explicit_none = Tokenizer.from_parts(hf, {"bos_token": None}, {"bos_token_id": endoftext})
    assert explicit_none.bos_token_id is None


def test_special_token_ids(tokenizers_by_kind):
    qwen = tokenizers_by_kind["qwen2.5"]
    assert {qwen.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")} <= (
        qwen.special_token_ids
    )
    assert qwen.token_to_id("<tool_call>") not in qwen.special_token_ids  # added, not special
    tool_call = qwen.encode("<tool_call>")
    assert len(tool_call) == 1 and qwen.decode(tool_call) == "<tool_call>"


def test_missing_special_tokens_are_added(tokenizer_dirs):
    hf = HFTokenizer.from_file(str(tokenizer_dirs["qwen2.5"] / "tokenizer.json"))
    before = hf.get_vocab_size()
    tok = Tokenizer.from_parts(hf, {"eos_token": "<|im_end|>", "image_token": "<|image|>"})
    assert hf.get_vocab_size() == before  # the caller's tokenizer is not modified
    assert tok.vocab_size == before + 1
    image = tok.token_to_id("<|image|>")
    assert image in tok.special_token_ids and tok.encode("a<|image|>b").count(image) == 1
    assert tok.special_tokens["image_token"] == "<|image|>"


def test_missing_tokenizer_json_is_a_typed_error(tmp_path):
    path = make_bpe_tokenizer_dir(tmp_path / "tok")
    (path / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        Tokenizer.from_pretrained(path)
    with pytest.raises(ModelLoadError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "nowhere")


def test_corrupt_files_are_typed_errors(tmp_path):
    path = make_bpe_tokenizer_dir(tmp_path / "tok")
    (path / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ModelLoadError, match="tokenizer_config.json"):
        Tokenizer.from_pretrained(path)
    path = make_bpe_tokenizer_dir(tmp_path / "tok2")
    (path / "tokenizer.json").write_text(json.dumps({"model": 1}), encoding="utf-8")
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        Tokenizer.from_pretrained(path)


def test_special_tokens_map_fills_config(tmp_path):
    path = make_bpe_tokenizer_dir(tmp_path / "tok", style="llama3")
    config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    del config["eos_token"]
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (path / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": {"content": "<|eom_id|>", "special": True}}), encoding="utf-8"
    )
    tok = Tokenizer.from_pretrained(path)
    assert tok.eos_token_id == tok.token_to_id("<|eom_id|>")


def test_bad_input_is_a_typed_error(tokenizers_by_kind):
    tok = tokenizers_by_kind["qwen2.5"]
    with pytest.raises(InvalidRequestError):
        tok.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError):
        tok.decode([-1])
    with pytest.raises(InvalidRequestError):
        tok.decode(["a"])  # type: ignore[list-item]
    assert tok.decode([tok.vocab_size + 5]) == ""  # unknown ids decode to nothing, as in HF
    assert tok.id_to_token(-1) is None and tok.token_to_id("no such token ✗") is None


def test_named_tokens_become_special_like_transformers(tmp_path, references):
    """A config naming a plain vocabulary token (or a non-special added token) as a special
    token makes it special: decode skips it, as transformers does."""
    path = make_bpe_tokenizer_dir(tmp_path / "tok")
    config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.update(eos_token="Hello", sep_token="<tool_call>")
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    ours = Tokenizer.from_pretrained(path)
    ref = type(references["qwen2.5"]).from_pretrained(str(path))
    ids = ours.encode("Hello x<tool_call> Hello")
    assert ids == ref.encode("Hello x<tool_call> Hello", add_special_tokens=False)
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True) == " x "
    assert set(ref.all_special_ids) <= ours.special_token_ids
    assert ours.vocab_size == len(ref)
