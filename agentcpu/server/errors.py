"""Every error the server returns, in OpenAI's shape, mapped from its class in one place.

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}

Client mistakes are 4xx (malformed JSON and wrong field types are 400, not FastAPI's 422);
a 5xx means a bug in agentcpu.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from agentcpu.errors import (
    AgentCPUError,
    CapacityError,
    ChatTemplateError,
    ContextLengthError,
    InvalidRequestError,
)

log = logging.getLogger(__name__)

MAX_LISTED_VALIDATION_ERRORS = 3
# pydantic puts the union member that failed into an error's location ("str",
# "list[TextContentPart]", "NamedToolChoice", a discriminator tag): not part of the field path.
_UNION_MEMBER = re.compile(
    r"^([a-z-]+\[.*\]|[a-z]+-[a-z-]+|str|int|float|bool|dict|list|none|[A-Z][A-Za-z]+)$"
)
_DISCRIMINATED = {"messages": 1, "response_format": 0}  # field -> how far its tag sits after it


class FieldError(InvalidRequestError):
    """A request field holds a value the server cannot honour."""

    def __init__(self, param: str, message: str):
        self.param = param
        super().__init__(f"{param}: {message}")


class ModelNotFoundError(InvalidRequestError):
    def __init__(self, model: str, served: tuple[str, ...]):
        super().__init__(f"model {model!r} does not exist; this server serves {list(served)}")


class QueueFullError(CapacityError):
    def __init__(self, in_flight: int, limit: int, retry_after_s: int):
        self.retry_after_s = retry_after_s
        super().__init__(
            f"the server is at its queue limit ({in_flight} of {limit} requests in flight); "
            f"retry after {retry_after_s} s"
        )


class AuthenticationError(AgentCPUError):
    pass


def error_response(
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def agentcpu_error_response(error: AgentCPUError) -> JSONResponse:
    """The one table from agentcpu's typed errors to HTTP statuses."""
    message = str(error)
    if isinstance(error, AuthenticationError):
        return error_response(401, message, "authentication_error", code="invalid_api_key")
    if isinstance(error, ModelNotFoundError):
        return error_response(404, message, param="model", code="model_not_found")
    if isinstance(error, QueueFullError):
        headers = {"Retry-After": str(error.retry_after_s)}
        return error_response(429, message, "rate_limit_error", code="queue_full", headers=headers)
    if isinstance(error, ContextLengthError):
        return error_response(400, message, code="context_length_exceeded")
    if isinstance(error, ChatTemplateError):
        return error_response(400, message, param="messages", code="chat_template_error")
    if isinstance(error, InvalidRequestError):
        return error_response(400, message, param=getattr(error, "param", None))
    if isinstance(error, CapacityError):  # this request can never fit the KV cache
        return error_response(400, message, code="exceeds_kv_cache")
    log.error("unexpected agentcpu error: %s", message)
    return error_response(500, message, "server_error")


def validation_error_response(error: RequestValidationError) -> JSONResponse:
    errors = sorted(error.errors(), key=_specificity, reverse=True)
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return error_response(
            400, f"the request body is not valid JSON: {detail}", code="json_invalid"
        )
    if tuple(first.get("loc", ())) == ("body",) and first.get("type") == "missing":
        return error_response(
            400, "the request body is required: a JSON object", code="missing_body"
        )
    problems = list(dict.fromkeys(f"{_field_path(e['loc'])}: {e['msg']}" for e in errors))
    listed = problems[:MAX_LISTED_VALIDATION_ERRORS]
    more = len(problems) - len(listed)
    message = "; ".join(listed) + (f" (and {more} more)" if more > 0 else "")
    return error_response(400, message, param=_field_path(first["loc"]), code="invalid_value")


def _specificity(error: dict) -> tuple[bool, int]:
    """For a union, the member that got furthest explains the problem best: a value
    error (out of bounds) before a type mismatch, then the deepest location."""
    return (not str(error.get("type", "")).endswith("_type"), len(error.get("loc", ())))


def _field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    """("body", "messages", 0, "user", "content", "str") -> "messages.0.content"."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    kept: list[Any] = []
    for i, part in enumerate(parts):
        if isinstance(part, str) and (_UNION_MEMBER.match(part) or _is_tag(parts, i)):
            continue
        kept.append(part)
    return ".".join(str(p) for p in kept) or "body"


def _is_tag(parts: list[Any], i: int) -> bool:
    for field, gap in _DISCRIMINATED.items():
        j = i - gap - 1
        if j >= 0 and parts[j] == field and (gap == 0 or isinstance(parts[i - 1], int)):
            return True
    return False


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, error: RequestValidationError) -> JSONResponse:
        return validation_error_response(error)

    @app.exception_handler(AgentCPUError)
    async def _typed(_: Request, error: AgentCPUError) -> JSONResponse:
        return agentcpu_error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, error: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if error.status_code < 500 else "server_error"
        return error_response(error.status_code, str(error.detail), type_, headers=error.headers)

    @app.exception_handler(Exception)
    async def _bug(_: Request, error: Exception) -> JSONResponse:
        log.exception("internal error", exc_info=error)
        return error_response(500, f"internal server error: {type(error).__name__}", "server_error")
