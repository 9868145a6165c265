"""Tools the server can run for an agent, and the registry the agent loop looks them up in.

A `Tool` is a name, a description, a JSON schema for its arguments and an async `call`
that returns the text the model will read. Three kinds exist: Python callables
(`python_tools`), the sandboxed code runner (`sandbox`) and MCP server tools
(`mcp_client`). `ToolExecutor` (`executor`) validates arguments with `validate_arguments`
and turns every failure into an error result the model can read.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import jsonschema

from agentcpu.errors import AgentCPUError, InvalidRequestError

# OpenAI's rule for function names; models and clients assume it.
TOOL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_TOOL_NAME_CHARS = 64


class ToolError(AgentCPUError):
    """A tool failed in a way worth telling the model (its message is what the model reads)."""


class ToolRegistrationError(ToolError, ValueError):
    """A tool cannot be registered: bad name, bad schema, duplicate, unsupported signature."""


class UnknownToolError(ToolError, InvalidRequestError):
    """A request or a model named a tool that is not registered."""


class ToolArgumentsError(ToolError, InvalidRequestError):
    """A tool's arguments are not valid JSON or do not match its schema."""


class ToolOutputError(ToolError):
    """A tool returned something that cannot be shown to the model as text."""


@dataclass(frozen=True)
class ToolResult:
    """What one tool call produced: `content` is the text the model reads next turn."""

    ok: bool
    content: str
    elapsed_s: float = 0.0


class Tool:
    """Base class of all tools.

    Subclasses set `name`, `description`, `parameters` (a JSON schema of type "object")
    and implement `call`. A tool whose work blocks a thread sets `blocking = True` and
    implements `call_blocking` instead; the executor then runs it in its thread pool.
    `timeout_s`, when set, overrides the executor's per-call timeout for this tool.
    """

    name: str
    description: str = ""
    parameters: dict[str, Any]
    blocking: bool = False
    timeout_s: float | None = None

    async def call(self, arguments: dict[str, Any]) -> str:
        raise NotImplementedError

    def call_blocking(self, arguments: dict[str, Any]) -> str:
        raise NotImplementedError

    def schema(self) -> dict[str, Any]:
        """This tool in the OpenAI `tools` form."""
        function = {
            "name": self.name,
            "description": self.description,
            "parameters": self.parameters,
        }
        return {"type": "function", "function": function}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def check_tool_name(name: str) -> str:
    if not isinstance(name, str) or not TOOL_NAME_PATTERN.match(name):
        raise ToolRegistrationError(
            f"tool name {name!r} must be 1-{MAX_TOOL_NAME_CHARS} characters of A-Z a-z 0-9 _ -"
        )
    return name


def sanitize_tool_name(name: str) -> str:
    """The closest valid tool name: other characters become "_", cut to the length limit."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]", "_", name)[:MAX_TOOL_NAME_CHARS]
    return cleaned or "tool"


def make_validator(tool: Tool) -> jsonschema.protocols.Validator:
    """A validator for the tool's parameter schema, which must itself be a valid schema."""
    schema = tool.parameters
    if not isinstance(schema, dict) or schema.get("type", "object") != "object":
        raise ToolRegistrationError(
            f"tool {tool.name!r}: parameters must be a JSON schema of type object"
        )
    validator_class = jsonschema.validators.validator_for(schema, jsonschema.Draft202012Validator)
    try:
        validator_class.check_schema(schema)
    except jsonschema.SchemaError as e:
        raise ToolRegistrationError(
            f"tool {tool.name!r}: invalid parameters schema: {e.message}"
        ) from None
    return validator_class(schema)


def parse_arguments(arguments: dict[str, Any] | str | None) -> dict[str, Any]:
    """Arguments as the model wrote them (a JSON string) or already decoded, as a dict."""
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        return {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise ToolArgumentsError(f"arguments are not valid JSON: {e}") from None
    if not isinstance(arguments, dict):
        raise ToolArgumentsError(f"arguments must be a JSON object, got {type(arguments).__name__}")
    return arguments


def to_content(value: Any) -> str:
    """A tool's return value as the text the model reads: strings as they are, else JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise ToolOutputError("returned bytes that are not UTF-8 text") from None
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ToolOutputError(f"returned a value that is not JSON-serialisable ({e})") from None


class ToolRegistry:
    """The tools one server can run, by name. Registration order is kept for `schemas()`."""

    def __init__(self, tools: Iterable[Tool] = ()):
        self._tools: dict[str, Tool] = {}
        self._validators: dict[str, jsonschema.protocols.Validator] = {}
        self.extend(tools)

    def register(self, tool: Tool, *, replace: bool = False) -> Tool:
        check_tool_name(tool.name)
        if tool.name in self._tools and not replace:
            raise ToolRegistrationError(f"a tool named {tool.name!r} is already registered")
        self._validators[tool.name] = make_validator(tool)
        self._tools[tool.name] = tool
        return tool

    def extend(self, tools: Iterable[Tool]) -> None:
        for tool in tools:
            self.register(tool)

    def unregister(self, name: str) -> None:
        self._tools.pop(name, None)
        self._validators.pop(name, None)

    def get(self, name: str) -> Tool:
        try:
            return self._tools[name]
        except KeyError:
            known = ", ".join(self._tools) or "none"
            raise UnknownToolError(f"unknown tool {name!r} (available: {known})") from None

    def names(self) -> list[str]:
        return list(self._tools)

    def schemas(self, names: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """OpenAI `tools` entries for all tools, or for `names` (each must exist)."""
        chosen = self._tools.values() if names is None else [self.get(n) for n in names]
        return [tool.schema() for tool in chosen]

    def validate_arguments(
        self, name: str, arguments: dict[str, Any] | str | None
    ) -> dict[str, Any]:
        """Decoded arguments for tool `name`, checked against its schema."""
        self.get(name)
        decoded = parse_arguments(arguments)
        error = jsonschema.exceptions.best_match(self._validators[name].iter_errors(decoded))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path)
            at = f" at '{where}'" if where else ""
            raise ToolArgumentsError(f"invalid arguments for tool {name!r}{at}: {error.message}")
        return decoded

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Iterator[Tool]:
        return iter(list(self._tools.values()))

    def __len__(self) -> int:
        return len(self._tools)
