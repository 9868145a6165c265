"""Incremental detokenization: deltas concatenate to decode(ids), incomplete UTF-8 is held."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentcpu.tokenizer import IncrementalDetokenizer, Tokenizer
from agentcpu.tokenizer.detokenizer import MAX_PENDING_TOKENS
from tests.tokenizer.fixtures import KINDS

ROUND_TRIP = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
# Mostly multi-byte characters, so they split across byte-level and byte-fallback tokens.
utf8_text = st.text(
    st.one_of(
        st.characters(codec="utf-8"),
        st.sampled_from("中文日本語한국어😀🎉👍🏽éàüßñ€—\n ▁"),
    ),
    max_size=60,
)
pieces = st.lists(
    st.one_of(utf8_text, st.sampled_from(["<|im_end|>", "<|eot_id|>", "<s>", "</s>", "<tool_call>"])),
    max_size=5,
).map("".join)


def stream(tokenizer: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    deltas = [detok.add(i) for i in ids] + [detok.flush()]
    assert detok.text == "".join(deltas)
    return deltas


@pytest.mark.parametrize("kind", KINDS)
@ROUND_TRIP
@given(text=pieces)
def test_deltas_concatenate_to_decode(tokenizers_by_kind, kind, text):
    tok = tokenizers_by_kind[kind]
    ids = tok.encode(text, add_special_tokens=True)
    for skip in (True, False):
        deltas = stream(tok, ids, skip)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
        if "\ufffd" not in text:  # valid text: a delta never ends in a partial character
            assert not any(d.endswith("\ufffd") for d in deltas)


@ROUND_TRIP
@given(data=st.data())
def test_random_ids_byte_level(tokenizers_by_kind, data):
    """Even garbage byte sequences stream exactly for byte-level BPE (lossy UTF-8 decoding
    keeps what precedes an invalid sequence)."""
    tok = tokenizers_by_kind["qwen2.5"]
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=40))
    assert "".join(stream(tok, ids)) == tok.decode(ids)


def _byte_level_ids(tok: Tokenizer, data: bytes) -> list[int]:
    """One token per byte, via GPT-2's byte-to-unicode alphabet."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    table = {b: chr(b) for b in printable}
    extra = (b for b in range(256) if b not in table)
    table.update({b: chr(256 + n) for n, b in enumerate(extra)})
    return [tok.token_to_id(table[b]) for b in data]


def test_holds_back_a_split_character_byte_level(tokenizers_by_kind):
    tok = tokenizers_by_kind["qwen2.5"]
    ids = _byte_level_ids(tok, "a中".encode())
    assert stream(tok, ids) == ["a", "", "", "中", ""]


def test_holds_back_a_split_character_byte_fallback(tokenizers_by_kind):
    tok = tokenizers_by_kind["metaspace"]
    emoji = [tok.token_to_id(f"<0x{b:02X}>") for b in "😀".encode()]
    assert stream(tok, tok.encode("a") + emoji) == ["a", "", "", "", "😀", ""]


def test_emits_the_complete_part_of_a_token_at_once(tokenizers_by_kind):
    """A byte-level token holding a whole character plus the start of the next one."""
    tok = tokenizers_by_kind["qwen2.5"]
    ids = tok.encode("中文")
    assert [tok.id_to_token(i) for i in ids] == ["ä¸Ńæĸ", "ĩ"]  # "中" + 2 of 文's 3 bytes
    assert stream(tok, ids) == ["中", "文", ""]


def test_metaspace_spaces(tokenizers_by_kind):
    tok = tokenizers_by_kind["metaspace"]
    for text in ["Hello world", "  two leading spaces", "a  b", "x\n y", "<s> after special"]:
        ids = tok.encode(text, add_special_tokens=True)
        assert "".join(stream(tok, ids)) == tok.decode(ids)
    assert stream(tok, tok.encode("Hello"))[0] == tok.decode(tok.encode("Hello")[:1])


def test_special_tokens_skipped_or_kept(tokenizers_by_kind):
    tok = tokenizers_by_kind["qwen2.5"]
    ids = tok.encode("hi<|im_end|>")
    assert "".join(stream(tok, ids, skip_special_tokens=True)) == "hi"
    assert "".join(stream(tok, ids, skip_special_tokens=False)) == "hi<|im_end|>"


def _spy_window(tok: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    sizes: list[int] = []
    decode = tok.decode

    def spying_decode(ids, skip_special_tokens=True):
        sizes.append(len(ids))
        return decode(ids, skip_special_tokens=skip_special_tokens)

    monkeypatch.setattr(tok, "decode", spying_decode)
    return sizes


@pytest.mark.parametrize("kind", KINDS)
def test_work_per_token_does_not_grow(tokenizer_dirs, kind, monkeypatch):
    tok = Tokenizer.from_pretrained(tokenizer_dirs[kind])
    ids = tok.encode("Café 中文 😀 naïve résumé, 東京は晴れです。\n" * 100)
    expected = tok.decode(ids)
    sizes = _spy_window(tok, monkeypatch)
    assert "".join(stream(tok, ids)) == expected
    assert len(ids) > 1000 and max(sizes) <= 12


def test_garbage_bytes_are_released_and_bounded(tokenizer_dirs, monkeypatch):
    """Every step ends in an incomplete character that never completes."""
    tok = Tokenizer.from_pretrained(tokenizer_dirs["qwen2.5"])
    ids = _byte_level_ids(tok, b"\xe4\xb8" * 200)
    expected = tok.decode(ids)
    sizes = _spy_window(tok, monkeypatch)
    assert "".join(stream(tok, ids)) == expected
    assert max(sizes) <= 2 * MAX_PENDING_TOKENS + 2


def test_garbage_byte_fallback_is_bounded(tokenizer_dirs, monkeypatch):
    """The backend's byte-fallback decode turns a whole run of byte tokens into U+FFFD when
    any is invalid, so the stream cannot equal it here; it must still stay bounded."""
    tok = Tokenizer.from_pretrained(tokenizer_dirs["metaspace"])
    ids = [tok.token_to_id(f"<0x{b:02X}>") for b in b"\xe4\xb8" * 200]
    sizes = _spy_window(tok, monkeypatch)
    text = "".join(stream(tok, ids))
    assert set(text) == {"\ufffd"} and max(sizes) <= 2 * MAX_PENDING_TOKENS + 2


def test_flush_and_text(tokenizers_by_kind):
    tok = tokenizers_by_kind["qwen2.5"]
    detok = IncrementalDetokenizer(tok)
    assert detok.flush() == "" and detok.text == ""
    for i in _byte_level_ids(tok, b"ok" + "中".encode()[:2]):
        detok.add(i)
    assert detok.text == "ok"
    assert detok.flush() == "\ufffd" and detok.text == "ok\ufffd"
    assert detok.flush() == ""
