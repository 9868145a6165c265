from __future__ import annotations

import pytest

from tests.structured.helpers import tokenizer_for


@pytest.fixture(scope="session")
def tokenizers(tmp_path_factory):
    """format -> Tokenizer whose family writes tool calls in that format (built once)."""
    root = tmp_path_factory.mktemp("structured-tokenizers")
    made = {}

    def get(fmt: str):
        if fmt not in made:
            made[fmt] = tokenizer_for(fmt, root)
        return made[fmt]

    return get


@pytest.fixture(scope="session")
def qwen(tokenizers):
    return tokenizers("hermes")
