"""Session-wide tokenizer directories, loaded by agentcpu and by transformers (the reference)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentcpu.tokenizer import Tokenizer
from tests.tokenizer.fixtures import KINDS, make_bpe_tokenizer_dir, make_metaspace_tokenizer_dir
from tests.tokenizer.templates import LLAMA3_1_TEMPLATE, QWEN2_5_TEMPLATE


def _build(kind: str, path: Path) -> Path:
    if kind == "qwen2.5":
        return make_bpe_tokenizer_dir(path, QWEN2_5_TEMPLATE, style="qwen2.5")
    if kind == "llama3":
        return make_bpe_tokenizer_dir(path, LLAMA3_1_TEMPLATE, style="llama3")
    return make_metaspace_tokenizer_dir(path)


@pytest.fixture(scope="session")
def tokenizer_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {kind: _build(kind, root / kind) for kind in KINDS}


@pytest.fixture(scope="session")
def tokenizers_by_kind(tokenizer_dirs: dict[str, Path]) -> dict[str, Tokenizer]:
    return {kind: Tokenizer.from_pretrained(path) for kind, path in tokenizer_dirs.items()}


@pytest.fixture(scope="session")
def references(tokenizer_dirs: dict[str, Path]) -> dict:
    """transformers' fast tokenizers on the same files (tokenizer.json used as written)."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return {
        kind: transformers.PreTrainedTokenizerFast.from_pretrained(str(path))
        for kind, path in tokenizer_dirs.items()
    }
