"""Per-request sampling parameters, validated once at the front door."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from agentcpu.errors import InvalidRequestError

# The sampler applies penalties in float32: a smaller repetition_penalty rounds to 0 (or
# a subnormal) there and turns logits into inf / NaN (found by the OpenAPI fuzzer with
# 5e-324).
MIN_REPETITION_PENALTY = 1.1754943508222875e-38  # the smallest normal float32


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop; mirrors vLLM's / OpenAI's fields.

    temperature 0 means greedy. top_k 0 (or -1) and top_p 1 and min_p 0 disable the
    filters. `logprobs` is the number of top alternatives to return per token (None: no
    logprobs). `stop` strings are cut from the output exactly (not included).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]
        self._check()

    def _check(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < -1:
            raise InvalidRequestError(f"top_k must be -1, 0 (off) or >= 1, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p}")
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty < math.inf:
            raise InvalidRequestError(
                f"repetition_penalty must be a positive float32 number (>= "
                f"{MIN_REPETITION_PENALTY:.3g}), got {self.repetition_penalty}"
            )
        if not -2 <= self.presence_penalty <= 2:
            raise InvalidRequestError(
                f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"
            )
        if not -2 <= self.frequency_penalty <= 2:
            raise InvalidRequestError(
                f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"
            )
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise InvalidRequestError(
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}"
            )
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise InvalidRequestError(f"logprobs must be in [0, 20], got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )
