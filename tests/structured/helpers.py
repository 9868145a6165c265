"""Tokenizers for the three tool-call formats, and a seeded random walk through a
constraint (random choices among the allowed tokens) that checks the mask each step."""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from agentcpu.tokenizer.tokenizer import Tokenizer
from tests.tokenizer.fixtures import make_bpe_tokenizer_dir, make_metaspace_tokenizer_dir
from tests.tokenizer.templates import LLAMA3_1_TEMPLATE

# Model vocab past the tokenizer's, as checkpoints pad their embeddings.
PADDED_VOCAB_MULTIPLE = 128
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[INST] {{ m.content }} [/INST]{% endfor %}[TOOL_CALLS]"
)
# Half the steps choose among the allowed tokens made only of closing characters (and
# EOS), so strings, arrays and objects end.
CLOSING_CHARS = set('"}], ')
CLOSING_BIAS = 0.5


def padded(vocab: int) -> int:
    return (vocab // PADDED_VOCAB_MULTIPLE + 1) * PADDED_VOCAB_MULTIPLE


def tokenizer_for(fmt: str, root: Path) -> Tokenizer:
    """hermes: Qwen2.5-style BPE; llama3_json: Llama-3-style BPE; mistral: SentencePiece-style
    with a special `[TOOL_CALLS]` token."""
    path = root / fmt
    if fmt == "hermes":
        return Tokenizer.from_pretrained(make_bpe_tokenizer_dir(path))
    if fmt == "llama3_json":
        return Tokenizer.from_pretrained(
            make_bpe_tokenizer_dir(path, LLAMA3_1_TEMPLATE, style="llama3")
        )
    make_metaspace_tokenizer_dir(path, MISTRAL_TEMPLATE)
    hf = HFTokenizer.from_file(str(path / "tokenizer.json"))
    hf.add_special_tokens([AddedToken("[TOOL_CALLS]", special=True, normalized=False)])
    hf.save(str(path / "tokenizer.json"))
    return Tokenizer.from_pretrained(path)


@functools.lru_cache(maxsize=8)
def _closing(tokenizer: Tokenizer, vocab_size: int) -> torch.Tensor:
    closing = torch.zeros(vocab_size, dtype=torch.bool)
    for i in range(tokenizer.vocab_size):
        text = tokenizer.decode([i], skip_special_tokens=False)
        closing[i] = i in tokenizer.eos_token_ids or (
            bool(text.strip()) and set(text) <= CLOSING_CHARS
        )
    return closing


def _pool(mask: torch.Tensor, closing: torch.Tensor, rng: random.Random) -> torch.Tensor:
    if rng.random() < CLOSING_BIAS and (mask & closing).any():
        return mask & closing
    return mask


def output_text(tokenizer: Tokenizer, ids: list[int]) -> str:
    """The output as a parser sees it: special triggers kept, EOS dropped."""
    return tokenizer.decode(
        [i for i in ids if i not in tokenizer.eos_token_ids], skip_special_tokens=False
    )


@dataclass
class Walk:
    ids: list[int] = field(default_factory=list)
    text: str = ""
    finished: bool = False
    eos_allowed_at: list[int] = field(default_factory=list)  # output lengths where EOS was allowed

    def complete_lengths(self) -> list[int]:
        """Output lengths at which the grammar was complete: EOS allowed, or finished."""
        ends = list(self.eos_allowed_at)
        if self.finished and (not ends or ends[-1] != len(self.ids)):
            ends.append(len(self.ids))
        return ends


def random_walk(
    constraint, tokenizer: Tokenizer, vocab_size: int, seed: int, max_steps: int = 400
) -> Walk:
    rng = random.Random(seed)
    closing = _closing(tokenizer, vocab_size)
    eos = sorted(tokenizer.eos_token_ids)
    walk = Walk()
    while not constraint.is_finished() and len(walk.ids) < max_steps:
        mask = constraint.allowed_mask(vocab_size)
        assert mask.dtype == torch.bool and mask.shape == (vocab_size,)
        assert not mask[tokenizer.vocab_size :].any(), "padding ids past the tokenizer were allowed"
        assert mask.any(), "the constraint allowed nothing"
        if mask[eos].any():
            walk.eos_allowed_at.append(len(walk.ids))
        token = rng.choice(_pool(mask, closing, rng).nonzero().view(-1).tolist())
        walk.ids.append(token)
        constraint.accept(token)
    walk.finished = constraint.is_finished()
    walk.text = output_text(tokenizer, walk.ids)
    return walk
