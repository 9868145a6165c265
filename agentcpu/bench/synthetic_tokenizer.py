"""A small byte-level BPE tokenizer for random-weight checkpoints.

Trained with Hugging Face `tokenizers` on a built-in corpus, then padded with unreachable
filler tokens so every id below the model's vocab size decodes: a random model samples
from the whole vocabulary, and vLLM and llama.cpp must be able to detokenize what it
emits. Special tokens sit at the ids the published checkpoints use.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

# Split patterns of the published Qwen2 and Llama 3 tokenizers (they differ in digit runs).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
MAX_TRAINED_TOKENS = 4096
FILLER_TOKEN = "<|filler_{}|>"
MODEL_MAX_LENGTH = 131072

CHATML_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object within "
    "<tool_call></tool_call> tags.<|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role != 'system' or not loop.first %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}{%- endif %}"
    "{%- for call in message.tool_calls | default([]) %}"
    "{%- set fn = call.function if call.function is defined else call %}"
    '{{- \'\\n<tool_call>\\n{"name": "\' + fn.name + \'", "arguments": \' }}'
    "{{- (fn.arguments if fn.arguments is string else fn.arguments | tojson) + '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

CORPUS = """\
The quick brown fox jumps over the lazy dog. A tokenizer splits text into pieces that a
language model reads one id at a time; byte-level BPE never meets an unknown character.
Agents call tools: they read a file, run the tests, search the web, then answer the user.
You are a helpful assistant. Think step by step, and call a tool when you need facts.
{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
{"name": "read_file", "arguments": {"path": "src/main.py", "start_line": 1, "end_line": 80}}
{"type": "function", "function": {"name": "search", "parameters": {"type": "object",
 "properties": {"query": {"type": "string"}, "top_k": {"type": "integer"}}}}}
def fibonacci(n: int) -> int:
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)

for i in range(10):
    print(f"{i:3d} {fibonacci(i):5d}")
class KVCache:
    def __init__(self, num_blocks, block_size):
        self.blocks = [None] * num_blocks
SELECT name, count(*) FROM requests WHERE status = 'done' GROUP BY name ORDER BY 2 DESC;
$ git status && pytest -q tests/ && echo "all green"
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 128 256 1024 4096 3.14159 2.71828 1e-6 -17 +23%.
Dates and times: 2024-05-17 09:30:00, Monday 3 June, 11:59 pm, Q3 2025.
Le renard brun saute par-dessus le chien paresseux. Der schnelle braune Fuchs springt.
El zorro marrón salta sobre el perro perezoso. Быстрая коричневая лиса прыгает.
敏捷的棕色狐狸跳过了懒狗。 素早い茶色の狐がのろまな犬を飛び越える。 🦊🐕✨
Memory bandwidth bounds decoding; matrix throughput bounds prefill. Prefix caching lets
a second turn skip the shared system prompt, and continuous batching keeps cores busy.
The results were: throughput 1,548 tokens/s, time to first token 0.41 s, p99 1.2 s.
"""
CORPUS_REPEATS = 8


def split_pattern_for(model_type: str) -> str:
    return LLAMA3_SPLIT_PATTERN if model_type == "llama" else QWEN2_SPLIT_PATTERN


def build_tokenizer(
    vocab_size: int, special_tokens: Mapping[str, int], split_pattern: str
) -> Tokenizer:
    """Train on the built-in corpus, then fill every id below `vocab_size`."""
    first_special = min(special_tokens.values())
    trained = _train(min(MAX_TRAINED_TOKENS, first_special), split_pattern)
    spec = json.loads(trained.to_str())
    spec["model"]["vocab"] = _dense_vocab(spec["model"]["vocab"], vocab_size, special_tokens)
    spec["added_tokens"] = [_added_token(text, id_) for text, id_ in special_tokens.items()]
    return Tokenizer.from_str(json.dumps(spec))


def _train(trained_vocab_size: int, split_pattern: str) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split_pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=trained_vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([CORPUS] * CORPUS_REPEATS, trainer=trainer)
    return tokenizer


def _dense_vocab(
    trained: dict[str, int], vocab_size: int, special_tokens: Mapping[str, int]
) -> dict[str, int]:
    if max(special_tokens.values()) >= vocab_size:
        raise ValueError(f"special token ids must be below the vocab size {vocab_size}")
    by_id = {id_: text for text, id_ in trained.items()}
    by_id.update({id_: text for text, id_ in special_tokens.items()})
    for id_ in range(vocab_size):
        by_id.setdefault(id_, FILLER_TOKEN.format(id_))
    vocab = {text: id_ for id_, text in sorted(by_id.items())}
    if len(vocab) != vocab_size:
        raise ValueError("filler tokens collide with trained tokens")
    return vocab


def _added_token(text: str, id_: int) -> dict:
    return {
        "id": id_,
        "content": text,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


def tokenizer_config(
    special_tokens: Mapping[str, int], bos: str | None, eos: str, pad: str
) -> dict:
    """`tokenizer_config.json` as transformers writes it for a fast tokenizer."""
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(id_): {k: v for k, v in _added_token(text, id_).items() if k != "id"}
            for text, id_ in sorted(special_tokens.items(), key=lambda item: item[1])
        },
        "bos_token": bos,
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": eos,
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": pad,
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }


def write_tokenizer_files(
    out_dir: Path,
    vocab_size: int,
    special_tokens: Mapping[str, int],
    model_type: str,
    bos: str | None,
    eos: str,
    pad: str,
) -> None:
    tokenizer = build_tokenizer(vocab_size, special_tokens, split_pattern_for(model_type))
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = tokenizer_config(special_tokens, bos, eos, pad)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special_map = {"eos_token": eos, "pad_token": pad} | ({"bos_token": bos} if bos else {})
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
