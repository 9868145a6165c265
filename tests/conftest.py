"""Shared fixtures: tiny random checkpoints made with transformers (test-only reference)."""

from __future__ import annotations

import pytest
import torch

from tests.models.reference import FAMILIES, make_checkpoint


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    """family -> path of a saved tiny random checkpoint (made once per session)."""
    made: dict[str, object] = {}

    def get(family: str, **overrides):
        key = (family, tuple(sorted(overrides.items())))
        if key not in made:
            path = tmp_path_factory.mktemp(f"ckpt-{family}")
            made[key] = make_checkpoint(path, family, **overrides)
        return made[key]

    return get


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


__all__ = ["FAMILIES"]
