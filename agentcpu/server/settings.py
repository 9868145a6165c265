"""What the HTTP server needs beyond the engine: names, auth, admission limits."""

from __future__ import annotations

from dataclasses import dataclass

from agentcpu.errors import InvalidRequestError

# The name every server answers to besides its own, so clients need not know the path.
DEFAULT_MODEL_ALIAS = "default"
# /v1/responses store bounds (OpenAI keeps stored responses 30 days)
DEFAULT_RESPONSE_STORE_MAX_COUNT = 10_000
DEFAULT_RESPONSE_STORE_MAX_MB = 256.0
DEFAULT_RESPONSE_STORE_TTL_S = 30 * 24 * 3600.0


@dataclass(frozen=True)
class ServerSettings:
    """`served_model_names[0]` is the id reported in responses; requests may name any.

    `max_queue` bounds the engine requests in flight (waiting + running; a request with
    `n` choices counts n); beyond it requests get 429 with `Retry-After: retry_after_s`.
    None means unbounded. `api_key` None means no authentication.

    `response_store_*`: where /v1/responses keeps stored responses (None: in memory
    only, lost at exit; `agentcpu serve` passes a per-user directory) and its bounds
    (count, MiB of JSON, idle seconds); see `server/response_store.py`.
    """

    served_model_names: tuple[str, ...] = (DEFAULT_MODEL_ALIAS,)
    api_key: str | None = None
    max_queue: int | None = None
    retry_after_s: int = 1
    response_store_dir: str | None = None
    response_store_max_count: int = DEFAULT_RESPONSE_STORE_MAX_COUNT
    response_store_max_mb: float = DEFAULT_RESPONSE_STORE_MAX_MB
    response_store_ttl_s: float = DEFAULT_RESPONSE_STORE_TTL_S

    def __post_init__(self) -> None:
        if not self.served_model_names or not all(self.served_model_names):
            raise InvalidRequestError("served_model_names must hold at least one non-empty name")
        if self.max_queue is not None and self.max_queue < 1:
            raise InvalidRequestError(f"max_queue must be >= 1, got {self.max_queue}")
        if self.api_key is not None and not self.api_key:
            raise InvalidRequestError("api_key must not be empty (leave it unset for no auth)")
        if self.retry_after_s < 1:
            raise InvalidRequestError(f"retry_after_s must be >= 1, got {self.retry_after_s}")
        store_bounds = (
            self.response_store_max_count,
            self.response_store_max_mb,
            self.response_store_ttl_s,
        )
        if min(store_bounds) <= 0:
            raise InvalidRequestError(f"response store bounds must be > 0, got {store_bounds}")

    @property
    def model_id(self) -> str:
        return self.served_model_names[0]

    @property
    def response_store_max_bytes(self) -> int:
        return int(self.response_store_max_mb * (1 << 20))

    @classmethod
    def for_model(cls, name: str, **kwargs) -> ServerSettings:
        """Serve under `name` and the alias "default"."""
        names = (name,) if name == DEFAULT_MODEL_ALIAS else (name, DEFAULT_MODEL_ALIAS)
        return cls(served_model_names=names, **kwargs)
