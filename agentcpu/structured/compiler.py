"""Grammars compiled against one tokenizer with llguidance, cached.

`compiler_for(tokenizer, vocab_size)` returns the tokenizer's `GrammarCompiler` from
`COMPILERS`, the one registry of this package (the llguidance tokenizer takes a while to
build on a 150k vocabulary, so it is built once per tokenizer). A compiler keeps the
last `GRAMMAR_CACHE_SIZE` compiled grammars and hands out copies of them.
"""

from __future__ import annotations

import functools
import json
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import llguidance

from agentcpu.errors import InvalidRequestError
from agentcpu.tokenizer.tokenizer import Tokenizer

GRAMMAR_CACHE_SIZE = 256
MASK_WORKERS = 1  # masks take ~10-50 µs: one thread keeps up with a whole batch
MAX_ERROR_CHARS = 600
QUIET = 0  # llguidance log level: errors come back through is_error()

# tokenizer -> {model vocab size -> compiler}; entries go when the tokenizer does.
COMPILERS: weakref.WeakKeyDictionary[Tokenizer, dict[int, GrammarCompiler]] = (
    weakref.WeakKeyDictionary()
)
_COMPILERS_LOCK = threading.Lock()


def compiler_for(tokenizer: Tokenizer, vocab_size: int) -> GrammarCompiler:
    with _COMPILERS_LOCK:
        per_vocab = COMPILERS.setdefault(tokenizer, {})
        if vocab_size not in per_vocab:
            per_vocab[vocab_size] = GrammarCompiler(tokenizer, vocab_size)
        return per_vocab[vocab_size]


class GrammarCompiler:
    """llguidance's view of one tokenizer, for a model with `vocab_size` logits."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        if vocab_size < 1:
            raise InvalidRequestError(f"vocab_size must be positive, got {vocab_size}")
        self.vocab_size = vocab_size
        # Ids past the tokenizer (padding rows of the embedding) are never allowed.
        self.n_vocab = max(vocab_size, tokenizer.vocab_size)
        eos = sorted(tokenizer.eos_token_ids) or None
        self.tokenizer = llguidance.LLTokenizer(
            tokenizer.backend.to_str(), n_vocab=self.n_vocab, eos_token=eos
        )
        self._token_ids = tokenizer.get_vocab()
        self._limits = llguidance.LLParserLimits(verbose_errors=False)
        self._compiled = functools.lru_cache(maxsize=GRAMMAR_CACHE_SIZE)(self._compile)
        # Computes each constrained request's next mask while the forward pass runs.
        self.mask_executor = ThreadPoolExecutor(MASK_WORKERS, thread_name_prefix="grammar-mask")

    def delimiter(self, text: str) -> str:
        """`text` as a grammar expression: its token when it is one added token (llguidance
        matches those only as tokens), else the string."""
        token_id = self._token_ids.get(text)
        if token_id is not None and self.tokenizer.is_special_token(token_id):
            return f"<[{token_id}]>"
        return json.dumps(text)  # a Lark string literal

    def matcher(self, grammar: str) -> llguidance.LLMatcher:
        """A fresh matcher at the start of `grammar`; InvalidRequestError if it does not compile."""
        return self._compiled(grammar).deep_copy()

    def _compile(self, grammar: str) -> llguidance.LLMatcher:
        matcher = llguidance.LLMatcher(
            self.tokenizer, grammar, log_level=QUIET, limits=self._limits
        )
        if matcher.is_error():
            raise InvalidRequestError(
                f"the schema cannot be enforced: {_short(matcher.get_error())}"
            )
        return matcher


def _short(message: str) -> str:
    message = message.strip()
    return message if len(message) <= MAX_ERROR_CHARS else message[:MAX_ERROR_CHARS] + "..."
