"""Build small, real Hugging Face tokenizer directories locally (no downloads possible).

`make_bpe_tokenizer_dir` writes a byte-level BPE tokenizer (GPT-2 / Qwen2 / Llama 3
style); `make_metaspace_tokenizer_dir` writes a SentencePiece-like one (Llama 2 /
Mistral style: "▁" for spaces, byte fallback `<0xNN>` tokens, `<s>` added as BOS). Both are
trained on a small multilingual corpus, so multi-byte characters are split across tokens.
Each directory holds tokenizer.json, tokenizer_config.json and generation_config.json, as
a checkpoint on the Hub does, and loads with both agentcpu and transformers.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Literal

from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from tests.tokenizer.templates import LLAMA2_TEMPLATE, QWEN2_5_TEMPLATE

BPE_VOCAB_SIZE = 1200
METASPACE_VOCAB_SIZE = 900
# The metaspace tokenizer is trained on the first lines only, so emoji, Korean, Greek, ...
# are not in its vocabulary and fall back to <0xNN> byte tokens.
METASPACE_TRAINING_LINES = 7

_CORPUS_LINES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today? I'm fine, thanks.",
    "def add(a, b):\n    return a + b\n",
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
    "Café, naïve, résumé, façade, jalapeño, Ångström, Straße, smörgåsbord.",
    "中文分词测试。我们在CPU上运行大语言模型，很快！",
    "日本語のテキストも少し入れておきます。東京は晴れです。",
    "한국어 문장도 하나 있습니다.",
    "Emoji: 😀 😃 🎉 👍🏽 🚀 🤖 — and a family: 👨‍👩‍👧.",
    "Ελληνικά και русский текст, עברית, العربية.",
    "Numbers 12345 67890 3.14159 and symbols #$%&*()[]{}<>",
    "Tabs\tand\nnewlines\r\n  indented   spaces.",
]

QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_EXTRA_TOKENS = ["<tool_call>", "</tool_call>"]  # added, but not special (as in Qwen2.5)
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
]

BpeStyle = Literal["qwen2.5", "llama3"]
# The tokenizer kinds the test suite builds: two byte-level BPE styles and one metaspace.
KINDS = ("qwen2.5", "llama3", "metaspace")


def corpus(lines: int | None = None) -> list[str]:
    return [line for line in _CORPUS_LINES[:lines] for _ in range(20)]


@functools.lru_cache(maxsize=1)
def _trained_byte_level_bpe_json() -> str:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer)
    return tokenizer.to_str()


@functools.lru_cache(maxsize=1)
def _trained_metaspace_json() -> str:
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=METASPACE_VOCAB_SIZE, show_progress=False
    )
    trainer_tok.train_from_iterator(corpus(METASPACE_TRAINING_LINES), trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for piece in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    )
    # Llama 2's tokenizer.json: spaces become "▁" in a normalizer, no pre-tokenizer.
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tokenizer.to_str()


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False), encoding="utf-8")


def _place_template(
    path: Path, config: dict, template: str | list[dict] | None, template_file: str
) -> None:
    if template is None:
        return
    if template_file == "config":
        config["chat_template"] = template
    elif template_file == "jinja":
        assert isinstance(template, str)
        (path / "chat_template.jinja").write_text(template, encoding="utf-8")
    elif template_file == "json":
        _write_json(path / "chat_template.json", {"chat_template": template})
    else:
        raise ValueError(f"template_file must be config, jinja or json, got {template_file!r}")


def _bpe_style(style: BpeStyle, tokenizer: Tokenizer) -> tuple[dict, dict]:
    """Add the family's special tokens; return (tokenizer_config, generation_config)."""
    if style == "qwen2.5":
        tokenizer.add_special_tokens([AddedToken(t, normalized=False) for t in QWEN_SPECIAL_TOKENS])
        extra = [AddedToken(t, normalized=False, special=False) for t in QWEN_EXTRA_TOKENS]
        tokenizer.add_tokens(extra)
        ids = {t: tokenizer.token_to_id(t) for t in QWEN_SPECIAL_TOKENS}
        config = {
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "unk_token": None,
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "errors": "replace",
        }
        generation = {"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]]}
        return config, generation
    if style == "llama3":
        tokenizer.add_special_tokens([AddedToken(t, normalized=False) for t in LLAMA3_SPECIAL_TOKENS])
        ids = {t: tokenizer.token_to_id(t) for t in LLAMA3_SPECIAL_TOKENS}
        bos = "<|begin_of_text|>"
        tokenizer.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{bos}:0 $A:0",
                    pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                    special_tokens=[(bos, ids[bos])],
                ),
            ]
        )
        config = {"bos_token": bos, "eos_token": "<|eot_id|>"}
        generation = {
            "bos_token_id": ids[bos],
            "eos_token_id": [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]],
        }
        return config, generation
    raise ValueError(f"unknown style {style!r}")


def make_bpe_tokenizer_dir(
    path: str | Path,
    template: str | list[dict] | None = QWEN2_5_TEMPLATE,
    *,
    style: BpeStyle = "qwen2.5",
    template_file: Literal["config", "jinja", "json"] = "config",
) -> Path:
    """Write a byte-level BPE tokenizer directory for `style` ("qwen2.5" or "llama3").

    qwen2.5: no BOS, eos `<|im_end|>`, generation_config eos [<|im_end|>, <|endoftext|>].
    llama3: BOS `<|begin_of_text|>` added by the tokenizer.json post-processor, eos
    `<|eot_id|>`, generation_config eos [<|end_of_text|>, <|eom_id|>, <|eot_id|>].
    `template` goes into tokenizer_config.json, chat_template.jinja or chat_template.json
    (`template_file`); a list of {"name", "template"} dicts is the multi-template form.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer.from_str(_trained_byte_level_bpe_json())
    config, generation = _bpe_style(style, tokenizer)
    tokenizer.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 32768,
        **config,
    }
    _place_template(path, config, template, template_file)
    _write_json(path / "tokenizer_config.json", config)
    _write_json(path / "generation_config.json", generation)
    return path


def make_metaspace_tokenizer_dir(
    path: str | Path,
    template: str | list[dict] | None = LLAMA2_TEMPLATE,
    *,
    template_file: Literal["config", "jinja", "json"] = "config",
) -> Path:
    """Write a Llama-2-style SentencePiece BPE directory: "▁" spaces, byte fallback, BOS `<s>`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    Tokenizer.from_str(_trained_metaspace_json()).save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False,
                      "normalized": False, "rstrip": False, "single_word": False},
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "legacy": False,
    }
    _place_template(path, config, template, template_file)
    _write_json(path / "tokenizer_config.json", config)
    _write_json(path / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2})
    return path
