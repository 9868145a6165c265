"""Real models' tokenizers, from the vocabulary-only GGUFs llama.cpp ships for its own
tokenizer tests (`models/ggml-vocab-*.gguf` with `.inp` texts and `.out` ids that
Hugging Face tokenizers produced). Runs when the llama.cpp source tree built by
benchmarks/peers/llamacpp.sh is present; nothing from it is copied into the repository.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agentcpu.loaders.gguf_file import GGUFModelFile
from agentcpu.loaders.gguf_tokenizer import tokenizer_from_gguf

VOCABS = Path(__file__).resolve().parents[2] / ".peers" / "llamacpp" / "src" / "models"
SEPARATOR = "\n__ggml_vocab_test__\n"
# Qwen2/2.5, Llama 3, Llama 2 / Mistral (SentencePiece), Phi-3 (SentencePiece), GPT-2.
NAMES = ["qwen2", "llama-bpe", "llama-spm", "phi-3", "gpt-2"]


@pytest.mark.skipif(not VOCABS.is_dir(), reason="llama.cpp source tree not built here")
@pytest.mark.parametrize("name", NAMES)
def test_real_vocabulary_tokenizes_like_hugging_face(name):
    path = VOCABS / f"ggml-vocab-{name}.gguf"
    texts = (VOCABS / f"{path.name}.inp").read_text(encoding="utf-8").split(SEPARATOR)
    lines = (VOCABS / f"{path.name}.out").read_text(encoding="utf-8").split("\n")
    tokenizer = tokenizer_from_gguf(GGUFModelFile(path))
    for text, line in zip(texts, lines, strict=False):
        expected = [int(token) for token in line.split()]
        assert tokenizer.encode(text) == expected, text
