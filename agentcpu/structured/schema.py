"""Checking what a request asks to constrain: JSON schemas, tools, tool_choice."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

import jsonschema

from agentcpu.errors import InvalidRequestError

AUTO, NONE, REQUIRED, NAMED = "auto", "none", "required", "named"
ANY_OBJECT_SCHEMA: dict = {"type": "object"}
# Checking a schema against the 2020-12 metaschema takes ~20 ms; agents resend the same
# tools every turn, so valid schemas are remembered (by their canonical JSON).
CHECKED_SCHEMA_CACHE_SIZE = 1024


@dataclass(frozen=True)
class ToolSpec:
    name: str
    parameters: dict
    strict: bool = False  # unsupported schema keywords are an error, not ignored


def check_schema(schema: Any, where: str) -> dict:
    """`schema` if it is a valid JSON schema object; InvalidRequestError naming `where` if not."""
    if not isinstance(schema, dict):
        raise InvalidRequestError(
            f"{where} must be a JSON schema object, got {type(schema).__name__}"
        )
    try:
        canonical = json.dumps(schema, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidRequestError(f"{where} is not JSON: {e}") from None
    try:
        _check_canonical(canonical)
    except jsonschema.SchemaError as e:
        at = "/".join(str(p) for p in e.absolute_path)
        raise InvalidRequestError(
            f"{where} is not a valid JSON schema: {e.message}"
            + (f" (at {where}/{at})" if at else "")
        ) from None
    return schema


@functools.lru_cache(maxsize=CHECKED_SCHEMA_CACHE_SIZE)
def _check_canonical(canonical: str) -> None:
    schema = json.loads(canonical)
    validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    validator.check_schema(schema)


def tool_specs(tools: list[dict]) -> list[ToolSpec]:
    """Name and parameters schema of each OpenAI tool (`{"type": "function", "function": {...}}`)."""
    if not isinstance(tools, list):
        raise InvalidRequestError(f"tools must be a list, got {type(tools).__name__}")
    return [_tool_spec(tool, i) for i, tool in enumerate(tools)]


def _tool_spec(tool: Any, i: int) -> ToolSpec:
    function = tool.get("function", tool) if isinstance(tool, dict) else None
    if not isinstance(function, dict):
        raise InvalidRequestError(f"tools[{i}] must be an object with a 'function' object")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequestError(f"tools[{i}].function.name must be a non-empty string")
    parameters = function.get("parameters")
    strict = function.get("strict") is True
    if parameters is None:
        return ToolSpec(name, ANY_OBJECT_SCHEMA, strict)
    return ToolSpec(name, check_schema(parameters, f"tools[{i}].function.parameters"), strict)


def tool_mode(tool_choice: Any, tools: list[ToolSpec]) -> tuple[str, list[ToolSpec]]:
    """(auto | none | required | named, the tools a call may use)."""
    if tool_choice is None:
        tool_choice = AUTO
    if isinstance(tool_choice, dict):
        return NAMED, [_named_tool(tool_choice, tools)]
    if tool_choice not in (AUTO, NONE, REQUIRED):
        raise InvalidRequestError(
            f"tool_choice must be 'auto', 'none', 'required' or a named function, got {tool_choice!r}"
        )
    if tool_choice == REQUIRED and not tools:
        raise InvalidRequestError("tool_choice 'required' needs at least one tool in tools")
    return (NONE if not tools else tool_choice), tools


def _named_tool(tool_choice: dict, tools: list[ToolSpec]) -> ToolSpec:
    function = tool_choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    for tool in tools:
        if tool.name == name:
            return tool
    raise InvalidRequestError(
        f"tool_choice names function {name!r}, which is not in tools {[t.name for t in tools]}"
    )


def response_schema(response_format: dict | None) -> tuple[dict | None, bool]:
    """(JSON schema the answer must match, strict) for `response_format`; None: free text."""
    if response_format is None:
        return None, False
    if not isinstance(response_format, dict):
        raise InvalidRequestError("response_format must be an object")
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None, False
    if kind == "json_object":
        return ANY_OBJECT_SCHEMA, False
    if kind != "json_schema":
        raise InvalidRequestError(
            f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}"
        )
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise InvalidRequestError("response_format.json_schema must be an object with a 'schema'")
    if spec.get("schema") is None:
        return ANY_OBJECT_SCHEMA, bool(spec.get("strict"))
    schema = check_schema(spec["schema"], "response_format.json_schema.schema")
    return schema, bool(spec.get("strict"))
