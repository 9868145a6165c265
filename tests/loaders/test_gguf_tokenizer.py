"""The tokenizer rebuilt from GGUF metadata behaves like the checkpoint's tokenizer.json."""

from __future__ import annotations

import functools

import pytest

from agentcpu.loaders.gguf_file import GGUFModelFile
from agentcpu.loaders.gguf_tokenizer import merges_from_scores, tokenizer_from_gguf
from agentcpu.tokenizer import Tokenizer
from tests.loaders.gguf_cases import FIXTURES, TOKENIZER_FILES, hf_dir
from tests.tokenizer.fixtures import corpus

EXTRA_TEXTS = [
    "", " ", "  leading spaces", "trailing  ", "a\n\n\nb", "\t tab", "123456789 3.14 2024",
    "don't I'll WE'RE you've", "<|im_start|>user\nhi<|im_end|>\n", "<s>Hello</s> <s>again",
    "<tool_call>{\"name\": \"f\"}</tool_call>", "<|begin_of_text|>Hi<|endoftext|>",
    "Ünïcödé ﬁ ligature and e\u0301 combining", "😀👍🏽🚀 mixed 中文 text",
]  # fmt: skip
TEXTS = sorted(set(corpus())) + EXTRA_TEXTS
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Hi."},
    {"role": "user", "content": "Weather in Paris?"},
]


@functools.cache
def pair(name: str) -> tuple[Tokenizer, Tokenizer]:
    gguf = tokenizer_from_gguf(GGUFModelFile(FIXTURES / name / TOKENIZER_FILES[name]))
    return Tokenizer.from_pretrained(hf_dir(name)), gguf


@pytest.mark.parametrize("name", sorted(TOKENIZER_FILES))
@pytest.mark.parametrize("add_special_tokens", [False, True])
def test_encode_matches_tokenizer_json(name, add_special_tokens):
    hf, gguf = pair(name)
    for text in TEXTS:
        expected = hf.encode(text, add_special_tokens=add_special_tokens)
        assert gguf.encode(text, add_special_tokens=add_special_tokens) == expected, text


@pytest.mark.parametrize("name", sorted(TOKENIZER_FILES))
def test_decode_matches_tokenizer_json(name):
    hf, gguf = pair(name)
    every_id = list(range(hf.vocab_size))
    for ids in [hf.encode(text, add_special_tokens=True) for text in TEXTS] + [every_id]:
        for skip in (True, False):
            assert gguf.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip), ids


@pytest.mark.parametrize("name", sorted(TOKENIZER_FILES))
def test_vocabulary_and_special_tokens_match(name):
    hf, gguf = pair(name)
    assert gguf.get_vocab() == hf.get_vocab()
    assert gguf.vocab_size == hf.vocab_size
    assert gguf.eos_token_ids == hf.eos_token_ids
    assert gguf.eos_token_id == hf.eos_token_id
    assert gguf.special_token_ids == hf.special_token_ids
    if hf.encode("x", add_special_tokens=True)[:1] != hf.encode("x")[:1]:
        assert gguf.bos_token_id == hf.bos_token_id


@pytest.mark.parametrize("name", sorted(TOKENIZER_FILES))
def test_chat_template_matches(name):
    hf, gguf = pair(name)
    assert gguf.chat_template == hf.chat_template
    assert gguf.apply_chat_template(MESSAGES) == hf.apply_chat_template(MESSAGES)


def test_hf_only_sentencepiece_file_has_no_scores():
    """The converter writes -1000 for every score of a tokenizer.json-only vocabulary;
    merges then follow token order (checked equal above)."""
    gguf = GGUFModelFile(FIXTURES / "llama-hfspm" / "vocab.gguf")
    assert set(gguf.get("tokenizer.ggml.scores")) == {-1000.0}
    assert gguf.get("tokenizer.ggml.merges") is None


def test_merges_from_scores_order_best_score_first():
    tokens = ["a", "b", "c", "ab", "bc", "abc", "<s>"]
    types = [1, 1, 1, 1, 1, 1, 3]
    scores = [0.0, 0.0, 0.0, -2.0, -1.0, -3.0, 0.0]
    merges = merges_from_scores(tokens, scores, types)
    assert merges == [("b", "c"), ("a", "b"), ("ab", "c"), ("a", "bc")]
