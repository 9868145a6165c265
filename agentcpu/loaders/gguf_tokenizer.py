"""Rebuild a model's tokenizer from GGUF metadata (a GGUF has no tokenizer.json).

Two vocabulary kinds, from `tokenizer.ggml.model`:
- "gpt2": byte-level BPE (Qwen2, Llama 3): tokens + merges; the pre-tokenizer split
  regex is named by `tokenizer.ggml.pre`.
- "llama": SentencePiece BPE (Llama 2, Mistral): tokens + scores, "▁" for spaces,
  `<0xNN>` byte fallback. Merges come from the file or, as transformers derives them
  from a sentencepiece model, from the scores.

Special tokens, add_bos / add_eos and the chat template(s) become the
tokenizer_config-shaped dict that `Tokenizer.from_parts` takes; end-of-generation ids
follow llama.cpp (eos, eot, eom and the usual end-of-turn tokens).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from gguf import Keys, TokenType
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from agentcpu.errors import ModelLoadError
from agentcpu.loaders.gguf_file import GGUFModelFile
from agentcpu.tokenizer import Tokenizer
from agentcpu.tokenizer.chat_template import DEFAULT_TEMPLATE_NAME

log = logging.getLogger(__name__)

SPACE_MARK = "\u2581"  # SentencePiece's "▁"
# Split patterns of the byte-level pre-tokenizers, by `tokenizer.ggml.pre` name.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT2_SPLIT = None  # ByteLevel's built-in GPT-2 regex
PRE_TOKENIZER_SPLITS: dict[str, str | None] = {
    "qwen2": QWEN2_SPLIT,
    "deepseek-r1-qwen": QWEN2_SPLIT,
    "llama3": LLAMA3_SPLIT,
    "llama-v3": LLAMA3_SPLIT,
    "llama-bpe": LLAMA3_SPLIT,
    "smaug-bpe": LLAMA3_SPLIT,
    "default": GPT2_SPLIT,
    "gpt-2": GPT2_SPLIT,
}
# Pre-tokenizers whose Hugging Face tokenizer.json normalizes to NFC (Qwen2's does).
NFC_PRE_TOKENIZERS = ("qwen2", "deepseek-r1-qwen")
# llama.cpp: these look a word up whole before merging (tokenizer.json "ignore_merges")
# and add BOS unless the file says otherwise.
LLAMA3_PRE_TOKENIZERS = ("llama3", "llama-v3", "llama-bpe", "smaug-bpe")
# Texts llama.cpp treats as end of generation (llama-vocab.cpp, "special_eog_ids").
EOG_TOKEN_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
    "<EOT>", "<|end_of_text|>",
)  # fmt: skip
SPECIAL_TOKEN_KEYS = {
    "bos_token": Keys.Tokenizer.BOS_ID,
    "eos_token": Keys.Tokenizer.EOS_ID,
    "unk_token": Keys.Tokenizer.UNK_ID,
    "pad_token": Keys.Tokenizer.PAD_ID,
}


def tokenizer_from_gguf(gguf: GGUFModelFile) -> Tokenizer | None:
    """The file's tokenizer, or None when it carries no vocabulary."""
    kind = gguf.get(Keys.Tokenizer.MODEL)
    if kind is None or kind == "none":
        log.warning("%s has no tokenizer: only token-id prompts are accepted", gguf.path)
        return None
    tokens = gguf.require(Keys.Tokenizer.LIST)
    types = gguf.get(Keys.Tokenizer.TOKEN_TYPE) or [TokenType.NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise ModelLoadError(f"{gguf.path}: {len(tokens)} tokens but {len(types)} token types")
    if kind == "gpt2":
        backend = _byte_level_bpe(gguf, tokens)
    elif kind == "llama":
        backend = _sentencepiece_bpe(gguf, tokens, types)
    else:
        raise ModelLoadError(
            f"GGUF tokenizer model {kind!r} is not supported (supported: gpt2, llama)"
        )
    _add_special_tokens(backend, tokens, types)
    config = _tokenizer_config(gguf, tokens, kind)
    return Tokenizer.from_parts(backend, config, _generation_config(gguf, tokens))


# -- the backend tokenizers -----------------------------------------------------------


def _byte_level_bpe(gguf: GGUFModelFile, tokens: list[str]) -> HFTokenizer:
    pre = gguf.get(Keys.Tokenizer.PRE) or "default"
    if pre not in PRE_TOKENIZER_SPLITS:
        log.warning(
            "%s: unknown pre-tokenizer %r; splitting text as GPT-2 does, so tokenization "
            "may differ from the original model's",
            gguf.path,
            pre,
        )
    merges = [tuple(merge.split(" ", 1)) for merge in gguf.get(Keys.Tokenizer.MERGES) or []]
    model = models.BPE(
        vocab=_vocab(tokens), merges=merges, ignore_merges=pre in LLAMA3_PRE_TOKENIZERS
    )
    tokenizer = HFTokenizer(model)
    split = PRE_TOKENIZER_SPLITS.get(pre, GPT2_SPLIT)
    if split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre in NFC_PRE_TOKENIZERS:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(gguf: GGUFModelFile, tokens: list[str], types: list[int]) -> HFTokenizer:
    unk_id = gguf.get(Keys.Tokenizer.UNK_ID)
    merges = gguf.get(Keys.Tokenizer.MERGES)
    if merges:
        merge_pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    else:
        merge_pairs = merges_from_scores(tokens, gguf.get(Keys.Tokenizer.SCORES), types)
    model = models.BPE(
        vocab=_vocab(tokens),
        merges=merge_pairs,
        unk_token=tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None,
        fuse_unk=True,
        byte_fallback=True,
    )
    tokenizer = HFTokenizer(model)
    # llama.cpp (and Llama 2's tokenizer.json) prefix a space to every text segment.
    add_prefix = bool(gguf.get(Keys.Tokenizer.ADD_PREFIX, True))
    steps = [normalizers.Prepend(SPACE_MARK)] if add_prefix else []
    tokenizer.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPACE_MARK)])
    decode_steps = [decoders.Replace(SPACE_MARK, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        decode_steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(decode_steps)
    return tokenizer


def merges_from_scores(
    tokens: list[str], scores: list[float] | None, types: list[int]
) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary, ordered as transformers'
    `generate_merges` orders them (best merged-token score first, then longer left
    piece), which is how Llama 2 / Mistral tokenizer.json files were made.

    Files converted from a tokenizer.json (not a tokenizer.model) carry one score for
    every token; the token id, which follows merge order in a trained BPE, stands in.
    """
    mergeable = {TokenType.NORMAL, TokenType.USER_DEFINED}
    vocab = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    if not scores or len(set(scores)) <= 1:
        scores = [-float(i) for i in range(len(tokens))]
    candidates = []
    for index, token in enumerate(tokens):
        if types[index] not in mergeable or vocab[token] != index:
            continue
        pairs = [
            (token[:cut], token[cut:])
            for cut in range(1, len(token))
            if token[:cut] in vocab and token[cut:] in vocab
        ]
        pairs.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        candidates.extend((left, right, scores[index]) for left, right in pairs)
    candidates.sort(key=lambda c: (c[2], len(c[0]), len(c[1])), reverse=True)
    return [(left, right) for left, right, _ in candidates]


def _vocab(tokens: list[str]) -> dict[str, int]:
    """Token text -> id; a text listed twice keeps its first id (as llama.cpp does)."""
    return dict(zip(reversed(tokens), range(len(tokens) - 1, -1, -1), strict=True))


def _add_special_tokens(backend: HFTokenizer, tokens: list[str], types: list[int]) -> None:
    """Control / unknown tokens become special added tokens, user-defined ones plain
    added tokens, so both are matched whole in text (as llama.cpp does)."""
    kinds = np.asarray(types)
    special = [
        AddedToken(tokens[i], special=True, normalized=False)
        for i in np.flatnonzero((kinds == TokenType.CONTROL) | (kinds == TokenType.UNKNOWN))
    ]
    user = [
        AddedToken(tokens[i], special=False, normalized=False)
        for i in np.flatnonzero(kinds == TokenType.USER_DEFINED)
    ]
    backend.add_special_tokens(special)
    backend.add_tokens(user)


# -- tokenizer_config / generation_config ---------------------------------------------


def _token_text(tokens: list[str], token_id: Any) -> str | None:
    if isinstance(token_id, int) and 0 <= token_id < len(tokens):
        return tokens[token_id]
    return None


def _tokenizer_config(gguf: GGUFModelFile, tokens: list[str], kind: str) -> dict[str, Any]:
    config: dict[str, Any] = {
        name: _token_text(tokens, gguf.get(key)) for name, key in SPECIAL_TOKEN_KEYS.items()
    }
    pre = gguf.get(Keys.Tokenizer.PRE)
    default_bos = kind == "llama" or pre in LLAMA3_PRE_TOKENIZERS
    config["add_bos_token"] = bool(gguf.get(Keys.Tokenizer.ADD_BOS, default_bos))
    config["add_eos_token"] = bool(gguf.get(Keys.Tokenizer.ADD_EOS, False))
    config["chat_template"] = _chat_templates(gguf)
    return config


def _chat_templates(gguf: GGUFModelFile) -> str | dict[str, str] | None:
    """tokenizer.chat_template, plus named ones (tokenizer.chat_template.<name>)."""
    default = gguf.get(Keys.Tokenizer.CHAT_TEMPLATE)
    names = gguf.get(Keys.Tokenizer.CHAT_TEMPLATES) or []
    named = {
        name: template
        for name in names
        if (template := gguf.get(Keys.Tokenizer.CHAT_TEMPLATE_N.format(name=name))) is not None
    }
    if not named:
        return default
    if default is not None:
        named[DEFAULT_TEMPLATE_NAME] = default
    return named


def _generation_config(gguf: GGUFModelFile, tokens: list[str]) -> dict[str, Any]:
    """End-of-generation ids as llama.cpp collects them."""
    eog = {
        token_id
        for key in (Keys.Tokenizer.EOS_ID, Keys.Tokenizer.EOT_ID, Keys.Tokenizer.EOM_ID)
        if _token_text(tokens, token_id := gguf.get(key)) is not None
    }
    vocab = _vocab(tokens)
    eog.update(vocab[text] for text in EOG_TOKEN_TEXTS if text in vocab)
    return {"eos_token_id": sorted(eog)} if eog else {}
