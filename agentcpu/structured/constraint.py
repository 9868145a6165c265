"""`GrammarConstraint`: the engine's `TokenConstraint` over an llguidance matcher."""

from __future__ import annotations

import logging
from concurrent.futures import Executor, Future

import llguidance
import numpy as np
import torch

log = logging.getLogger(__name__)

BITS_PER_WORD = 32
BYTES_PER_WORD = 4


def bitmask_to_bool(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 bitmask (bit i of word w = token 32*w + i) -> bool [vocab_size], vectorised."""
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little").view(np.bool_)
    if bits.shape[0] >= vocab_size:
        return torch.from_numpy(bits[:vocab_size])
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[: bits.shape[0]] = torch.from_numpy(bits)
    return mask


class GrammarConstraint:
    """Allows the tokens that keep the output in the grammar; EOS only once it is complete.

    With an `executor`, the next mask is computed as soon as a token is accepted, on the
    executor's thread (llguidance releases the GIL), so it overlaps the next forward pass;
    `allowed_mask` then only waits for it and unpacks the bits. While that computation
    runs, nothing else touches the matcher.
    """

    def __init__(
        self, matcher: llguidance.LLMatcher, n_vocab: int, executor: Executor | None = None
    ):
        self._matcher = matcher
        self._executor = executor
        self._bitmask = torch.zeros(
            (n_vocab + BITS_PER_WORD - 1) // BITS_PER_WORD, dtype=torch.int32
        )
        self._filled = False  # the bitmask holds the mask for the current position
        self._mask: torch.Tensor | None = None
        self._pending: Future | None = None
        self._stopped = matcher.is_stopped()
        self._start_next_mask()

    def allowed_mask(self, vocab_size: int) -> torch.Tensor:
        self._wait()
        if not self._filled:
            self._fill()
        if self._mask is None or self._mask.shape[0] != vocab_size:
            self._mask = bitmask_to_bool(self._bitmask, vocab_size)
        return self._mask

    def accept(self, token_id: int) -> None:
        self._wait()
        self._filled, self._mask = False, None
        if not self._matcher.consume_token(token_id):
            log.warning("constraint rejected token %d: %s", token_id, self._matcher.get_error())
        self._stopped = self._matcher.is_stopped()
        self._start_next_mask()

    def is_finished(self) -> bool:
        """Complete (nothing may follow), ended by EOS, or failed on a token it forbade."""
        return self._stopped

    @property
    def error(self) -> str | None:
        self._wait()
        return self._matcher.get_error() or None

    def _fill(self) -> None:
        self._matcher.unsafe_compute_mask_ptr(
            self._bitmask.data_ptr(), self._bitmask.numel() * BYTES_PER_WORD
        )
        self._filled = True

    def _start_next_mask(self) -> None:
        if self._executor is not None and not self._stopped:
            self._pending = self._executor.submit(self._fill)

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()
