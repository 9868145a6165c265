"""The seam between the engine and constrained decoding (`structured/`).

A request may carry a `TokenConstraint`. Each step the runner asks it which tokens are
allowed (None: no restriction this step, e.g. a tool-call grammar not yet triggered)
and the engine tells it which token was chosen. The engine knows nothing else about
grammars.
"""

from __future__ import annotations

from typing import Protocol

import torch


class TokenConstraint(Protocol):
    def allowed_mask(self, vocab_size: int) -> torch.Tensor | None:
        """Bool [vocab_size] of tokens allowed next, or None when all are allowed."""

    def accept(self, token_id: int) -> None:
        """Advance past the sampled token."""

    def is_finished(self) -> bool:
        """True when the constrained output is complete and the request should stop."""
