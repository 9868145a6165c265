"""What every route shares: the engine front door, settings, metrics, admission."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import Request

from agentcpu.engine.async_engine import AsyncEngine
from agentcpu.engine.llm_engine import LLMEngine
from agentcpu.errors import CapacityError, ContextLengthError, InvalidRequestError
from agentcpu.server.errors import ModelNotFoundError, QueueFullError
from agentcpu.server.metrics import ServerMetrics
from agentcpu.server.response_store import ResponseStore
from agentcpu.server.settings import ServerSettings
from agentcpu.server.tool_pauses import ToolPauses

if TYPE_CHECKING:
    from agentcpu.server.server_tools import ServerTools


class Ticket:
    """`n` admitted engine requests; `release()` is idempotent, so every exit path may call it."""

    def __init__(self, admission: Admission, n: int):
        self._admission, self._n = admission, n

    def release(self) -> None:
        if self._n:
            self._admission.release(self._n)
            self._n = 0


@dataclass
class Admission:
    """Counts engine requests in flight (waiting + running) and refuses past `limit`.

    Counted on the event loop at admission, not read from the scheduler, so a burst of
    requests cannot all slip in before the engine thread has queued any of them.
    """

    limit: int | None
    retry_after_s: int
    metrics: ServerMetrics
    in_flight: int = 0

    def admit(self, n: int) -> Ticket:
        if self.limit is not None and self.in_flight + n > self.limit:
            raise QueueFullError(self.in_flight, self.limit, self.retry_after_s)
        self.in_flight += n
        self.metrics.in_flight.set(self.in_flight)
        return Ticket(self, n)

    def release(self, n: int) -> None:
        self.in_flight -= n
        self.metrics.in_flight.set(self.in_flight)


@dataclass
class ServerState:
    front: AsyncEngine
    settings: ServerSettings
    metrics: ServerMetrics
    admission: Admission
    tool_format: str | None
    created: int = field(default_factory=lambda: int(time.time()))
    tools: ServerTools | None = None  # what server_tools requests may run (server_tools.py)
    responses: ResponseStore | None = None  # stored /v1/responses (create_app makes one)
    tool_pauses: ToolPauses = field(default_factory=ToolPauses)  # client tools' latency

    @property
    def engine(self) -> LLMEngine:
        return self.front.engine

    @property
    def tokenizer(self):
        if self.engine.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer: only token-id prompts work")
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.config.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.config.model_config.vocab_size

    def engine_alive(self) -> bool:
        # AsyncEngine has no public liveness probe yet; its loop thread is the truth.
        thread = getattr(self.front, "_thread", None)
        return thread is None or thread.is_alive()

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.settings.served_model_names:
            raise ModelNotFoundError(name, self.settings.served_model_names)

    def token_capacity(self) -> int:
        """The most tokens (prompt + output) one request can ever hold."""
        kv = self.engine.kv
        return min(self.max_model_len, kv.pool.num_blocks * kv.block_size)

    def default_max_tokens(self, num_prompt_tokens: int) -> int:
        room = self.token_capacity() - num_prompt_tokens
        if room < 1:
            raise ContextLengthError(num_prompt_tokens, 1, self.max_model_len)
        return room

    def check_prompt(self, prompt: list[int], max_tokens: int) -> None:
        """Refuse now what the engine would refuse later, so a stream never starts doomed.

        The engine checks again on its thread; this copy turns the refusal into an HTTP
        status before any response header is sent.
        """
        if not prompt:
            raise InvalidRequestError("the prompt is empty: at least one token is required")
        bad = next((t for t in prompt if t >= self.vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(
                f"prompt token id {bad} is outside the vocabulary [0, {self.vocab_size})"
            )
        if len(prompt) + max_tokens > self.max_model_len:
            raise ContextLengthError(len(prompt), max_tokens, self.max_model_len)
        if len(prompt) + max_tokens > self.token_capacity():
            raise CapacityError(
                f"prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) exceeds the KV "
                f"cache's {self.token_capacity()} tokens: lower max_tokens"
            )


def get_state(request: Request) -> ServerState:
    return request.app.state.server
