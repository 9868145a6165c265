"""/openapi.json as the server really behaves: error bodies in OpenAI's shape, 400 (not
FastAPI's 422) for invalid input, event streams documented next to JSON answers."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from agentcpu.server.protocol import ErrorResponse

_ERROR = {"model": ErrorResponse}
ENDPOINT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the answer; with stream=true, server-sent events "
        "(`data: {chunk}` lines, ending with `data: [DONE]`)",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    },
    400: {**_ERROR, "description": "invalid request (the message and `param` name the field)"},
    401: {**_ERROR, "description": "missing or wrong API key (when the server has one)"},
    404: {**_ERROR, "description": "unknown model"},
    429: {**_ERROR, "description": "queue full; see the Retry-After header"},
}
MODEL_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: ENDPOINT_RESPONSES[401],
    404: ENDPOINT_RESPONSES[404],
}
_FASTAPI_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")


def install_openapi(app: FastAPI, model_names: tuple[str, ...], bearer_auth: bool) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, routes=app.routes, description=app.description
            )
            _drop_422(schema)
            _name_the_models(schema, list(model_names))
            if bearer_auth:
                _add_bearer_auth(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _drop_422(schema: dict[str, Any]) -> None:
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            operation.get("responses", {}).pop("422", None)
    components = schema.get("components", {}).get("schemas", {})
    for name in _FASTAPI_VALIDATION_SCHEMAS:
        components.pop(name, None)


def _name_the_models(schema: dict[str, Any], names: list[str]) -> None:
    """`model` accepts only the served names (others get 404): say so."""
    components = schema.get("components", {}).get("schemas", {})
    for request in ("ChatCompletionRequest", "CompletionRequest", "ResponsesRequest"):
        model = components.get(request, {}).get("properties", {}).get("model", {})
        for option in model.get("anyOf", []):
            if option.get("type") == "string":
                option["enum"] = names
    for parameter in (
        schema["paths"].get("/v1/models/{model}", {}).get("get", {}).get("parameters", [])
    ):
        if parameter.get("name") == "model":
            parameter["schema"]["enum"] = names


def _add_bearer_auth(schema: dict[str, Any]) -> None:
    schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
    schemes["bearerAuth"] = {"type": "http", "scheme": "bearer"}
    for route, path in schema.get("paths", {}).items():
        if route.startswith("/v1"):
            for operation in path.values():
                operation["security"] = [{"bearerAuth": []}]
