"""A request is counters: `num_computed_tokens` catches up with `num_tokens`.

Prefill, chunked prefill, a prefix-cache hit, recompute after preemption and resume after
a tool call are all the same thing: the scheduler moves the counter forward.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from agentcpu.engine.constraint import TokenConstraint
from agentcpu.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prompt tokens served from the prefix cache (first schedule)
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    num_published_blocks: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    num_preemptions: int = 0
    generator: torch.Generator | None = None
    constraint: TokenConstraint | None = None
    session_id: str | None = None  # KV of a finished turn is pinned for this session
    pin_ttl_s: float = 0.0
    # output bookkeeping owned by the engine's postprocess
    logprobs: list = field(default_factory=list)
    first_token_time: float | None = None
    # the runner's cache: (block ids, cache slot of every position in those blocks)
    slot_cache: tuple[list[int], torch.Tensor] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.params.seed is not None and self.generator is None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def token(self, index: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[index] if index < n else self.output_token_ids[index - n]

    def tokens(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        return (self.prompt_token_ids + self.output_token_ids)[start:end]

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
