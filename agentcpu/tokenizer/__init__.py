"""Tokenizers, chat templates and incremental detokenization (Hugging Face formats)."""

from agentcpu.tokenizer.detokenizer import IncrementalDetokenizer
from agentcpu.tokenizer.tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer", "Tokenizer"]
