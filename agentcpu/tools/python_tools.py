"""Plain Python functions as tools (`agentcpu serve --tools mymodule` or `--tools path/to/file.py`).

Which functions of a module become tools:
  1. if any function is decorated with `@tool`, exactly those;
  2. else, if the module defines `__all__`, the functions it lists;
  3. else, every public function defined in the module itself (not imported into it).

A function's JSON schema comes from its type hints (str, int, float, bool, list[T],
tuple[T, ...], set[T], dict[str, T], Optional / `T | None`, unions, Literal -> enum,
Annotated[T, "description"], Any or no hint -> any value); a parameter with a default is
not required. The description and per-parameter descriptions come from the docstring
(Google "Args:", NumPy "Parameters" or Sphinx ":param x:" style). Sync functions run in
the executor's thread pool; async functions are awaited on the event loop.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import importlib
import importlib.util
import inspect
import json
import re
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agentcpu.tools.registry import (
    Tool,
    ToolRegistrationError,
    ToolRegistry,
    check_tool_name,
    to_content,
)

TOOL_MARK = "__agentcpu_tool__"
_PY_TO_JSON = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}
_GOOGLE_SECTIONS = {"args", "arguments", "parameters", "params", "keyword args", "kwargs"}
_OTHER_SECTIONS = {
    "returns",
    "return",
    "yields",
    "raises",
    "examples",
    "example",
    "notes",
    "note",
    "see also",
    "references",
    "attributes",
    "warnings",
    "warning",
    "todo",
}


def tool(fn: Callable | None = None, *, name: str | None = None, description: str | None = None):
    """Mark a function as a tool: `@tool`, or `@tool(name="x", description="...")`."""

    def mark(f: Callable) -> Callable:
        setattr(f, TOOL_MARK, {"name": name, "description": description})
        return f

    return mark(fn) if fn is not None else mark


class FunctionTool(Tool):
    """A Python function called with the model's (validated) arguments as keywords."""

    def __init__(self, fn: Callable, *, name: str | None = None, description: str | None = None):
        self.fn = fn
        self.name = check_tool_name(name or fn.__name__)
        summary, param_docs = parse_docstring(inspect.getdoc(fn) or "")
        self.description = description if description is not None else summary
        self.parameters, self._positional_only = signature_schema(fn, param_docs)
        self.blocking = not inspect.iscoroutinefunction(fn)
        self._enums = _enum_parameters(fn)

    def _split(self, arguments: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
        kwargs = {k: self._enums[k](v) if k in self._enums else v for k, v in arguments.items()}
        args = [kwargs.pop(p) for p in self._positional_only if p in kwargs]
        return args, kwargs

    def call_blocking(self, arguments: dict[str, Any]) -> str:
        args, kwargs = self._split(arguments)
        return to_content(self.fn(*args, **kwargs))

    async def call(self, arguments: dict[str, Any]) -> str:
        if self.blocking:
            return await asyncio.to_thread(self.call_blocking, arguments)
        args, kwargs = self._split(arguments)
        return to_content(await self.fn(*args, **kwargs))


# ---- schema from type hints ------------------------------------------------------------


def signature_schema(fn: Callable, param_docs: dict[str, str]) -> tuple[dict[str, Any], list[str]]:
    """(JSON schema of fn's parameters, names of its positional-only parameters)."""
    where = getattr(fn, "__qualname__", repr(fn))
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception as e:  # an unresolvable forward reference names a type we cannot map
        raise ToolRegistrationError(f"{where}: cannot resolve type hints ({e})") from None
    properties: dict[str, Any] = {}
    required: list[str] = []
    positional_only: list[str] = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise ToolRegistrationError(f"{where}: *args / **kwargs cannot be described to a model")
        if p.kind == p.POSITIONAL_ONLY:
            positional_only.append(p.name)
        prop = type_schema(hints.get(p.name, Any), f"{where}({p.name})")
        if p.name in param_docs and "description" not in prop:
            prop["description"] = param_docs[p.name]
        if p.default is p.empty:
            required.append(p.name)
        elif (default := _as_json(p.default)) is not _NOT_JSON:
            prop["default"] = default
        properties[p.name] = prop
    schema: dict[str, Any] = {"type": "object", "properties": properties, "required": required}
    schema["additionalProperties"] = False  # no **kwargs: any other argument is a TypeError
    return schema, positional_only


def type_schema(hint: Any, where: str) -> dict[str, Any]:
    """The JSON schema of one Python type hint."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is inspect.Parameter.empty:
        return {}
    if hint in _PY_TO_JSON:
        return {"type": _PY_TO_JSON[hint]}
    if origin is typing.Annotated:
        schema = type_schema(args[0], where)
        notes = [a for a in args[1:] if isinstance(a, str)]
        return {**schema, "description": " ".join(notes)} if notes else schema
    if origin is typing.Literal:
        return _enum_schema(list(args), where)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return _enum_schema([member.value for member in hint], where)
    if origin in (typing.Union, types.UnionType):
        return _union_schema(args, where)
    if hint in (list, tuple, set, frozenset) or origin in (list, set, frozenset):
        return _array_schema(hint, args, where)
    if origin is tuple:
        return _tuple_schema(args, where)
    if hint is dict or origin is dict:
        return _object_schema(args, where)
    raise ToolRegistrationError(f"{where}: type {hint!r} has no JSON schema mapping")


def _enum_schema(values: list[Any], where: str) -> dict[str, Any]:
    kinds = {type(v) for v in values}
    if not all(k in _PY_TO_JSON for k in kinds):
        raise ToolRegistrationError(f"{where}: enum values must be str, int, float, bool or None")
    schema: dict[str, Any] = {"enum": values}
    if len(kinds) == 1:
        schema["type"] = _PY_TO_JSON[kinds.pop()]
    return schema


def _union_schema(args: tuple[Any, ...], where: str) -> dict[str, Any]:
    options = [type_schema(a, where) for a in args]
    if any(not o for o in options):
        return {}
    simple = [o["type"] for o in options if set(o) == {"type"} and isinstance(o["type"], str)]
    if len(simple) == len(options):
        return {"type": simple}
    return {"anyOf": options}


def _array_schema(hint: Any, args: tuple[Any, ...], where: str) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "array"}
    if args:
        schema["items"] = type_schema(args[0], where)
    if hint in (set, frozenset) or typing.get_origin(hint) in (set, frozenset):
        schema["uniqueItems"] = True
    return schema


def _tuple_schema(args: tuple[Any, ...], where: str) -> dict[str, Any]:
    if len(args) == 2 and args[1] is Ellipsis:
        return {"type": "array", "items": type_schema(args[0], where)}
    items = [type_schema(a, where) for a in args]
    return {"type": "array", "prefixItems": items, "minItems": len(items), "maxItems": len(items)}


def _object_schema(args: tuple[Any, ...], where: str) -> dict[str, Any]:
    if args and args[0] is not str:
        raise ToolRegistrationError(f"{where}: JSON object keys are strings, not {args[0]!r}")
    schema: dict[str, Any] = {"type": "object"}
    if len(args) == 2 and args[1] is not Any:
        schema["additionalProperties"] = type_schema(args[1], where)
    return schema


_NOT_JSON = object()


def _enum_parameters(fn: Callable) -> dict[str, type[enum.Enum]]:
    """Parameters typed with an Enum: the model sends a member's value, the function gets the member."""
    hints = typing.get_type_hints(fn)
    return {n: h for n, h in hints.items() if isinstance(h, type) and issubclass(h, enum.Enum)}


def _as_json(value: Any) -> Any:
    """The value as JSON would carry it (tuples become lists, Enum members their value), or _NOT_JSON."""
    if isinstance(value, enum.Enum):
        value = value.value
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError):
        return _NOT_JSON


# ---- docstrings --------------------------------------------------------------------------

_SPHINX_PARAM = re.compile(r"^:param\s+(?:[^:]*\s)?(\w+):\s*(.*)$")
_GOOGLE_PARAM = re.compile(r"^\*{0,2}(\w+)\s*(?:\(([^)]*)\))?\s*:(.*)$")
_NUMPY_PARAM = re.compile(r"^\*{0,2}(\w+)\s*(?::\s*(.*))?$")


def parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """(description, {parameter: description}) from a Google, NumPy or Sphinx docstring."""
    lines = inspect.cleandoc(doc).splitlines() if doc else []
    description: list[str] = []
    params: dict[str, str] = {}
    i = 0
    while i < len(lines):
        section, body_start, numpy = _section_at(lines, i)
        if section is None:
            if not lines[i].strip().startswith(":"):
                description.append(lines[i])
            i += 1
            continue
        body, i = _section_body(lines, body_start)
        if section in _GOOGLE_SECTIONS:
            params.update(_parse_params(body, numpy))
    for line in lines:
        m = _SPHINX_PARAM.match(line.strip())
        if m:
            params.setdefault(m.group(1), m.group(2).strip())
    return "\n".join(description).strip(), params


def _section_at(lines: list[str], i: int) -> tuple[str | None, int, bool]:
    """(section name, index of its first body line, NumPy style?) if a section starts at i."""
    text = lines[i].strip()
    names = _GOOGLE_SECTIONS | _OTHER_SECTIONS
    if text.endswith(":") and text[:-1].lower() in names:
        return text[:-1].lower(), i + 1, False
    underline = lines[i + 1].strip() if i + 1 < len(lines) else ""
    if text.lower() in names and underline and set(underline) == {"-"}:
        return text.lower(), i + 2, True
    return None, i, False


def _section_body(lines: list[str], start: int) -> tuple[list[str], int]:
    """The lines of a section up to the next section header (or the end)."""
    end = start
    while end < len(lines) and _section_at(lines, end)[0] is None:
        end += 1
    return lines[start:end], end


def _parse_params(body: list[str], numpy: bool) -> dict[str, str]:
    """Entries of an Args / Parameters section: a name line at the section's least indent,
    then more-indented continuation lines. NumPy's "name : type" line holds no description."""
    indents = [len(line) - len(line.lstrip()) for line in body if line.strip()]
    base = min(indents, default=0)
    params: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in body:
        if not line.strip():
            continue
        indent, text = len(line) - len(line.lstrip()), line.strip()
        if indent == base:
            m = (_NUMPY_PARAM if numpy else _GOOGLE_PARAM).match(text)
            current = params.setdefault(m.group(1), []) if m else None
            if current is not None and not numpy and m.group(3):
                current.append(m.group(3).strip())
        elif current is not None:
            current.append(text)
    return {name: " ".join(words) for name, words in params.items() if words}


# ---- loading modules ---------------------------------------------------------------------


def load_module(spec: str) -> types.ModuleType:
    """Import `spec`: a dotted module name, or a path to a .py file."""
    path = Path(spec)
    if spec.endswith(".py") or path.is_file():
        if not path.is_file():
            raise ToolRegistrationError(f"--tools {spec}: no such file")
        resolved = path.resolve()
        digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
        stem = re.sub(r"\W", "_", path.stem)
        module_name = f"agentcpu_user_tools_{stem}_{digest}"
        if module_name in sys.modules:
            return sys.modules[module_name]
        module_spec = importlib.util.spec_from_file_location(module_name, resolved)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
        try:
            module_spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[module_name]
            raise
        return module
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as e:
        raise ToolRegistrationError(f"--tools {spec}: cannot import ({e})") from None


def module_functions(module: types.ModuleType) -> list[Callable]:
    """The functions of `module` that become tools (see the module docstring for the rule)."""
    members = vars(module)
    marked = [f for f in members.values() if inspect.isfunction(f) and hasattr(f, TOOL_MARK)]
    if marked:
        return marked
    exported = members.get("__all__")
    if exported is not None:
        chosen = [members.get(n) for n in exported]
        return [f for f in chosen if inspect.isfunction(f)]
    return [
        f
        for n, f in members.items()
        if inspect.isfunction(f) and not n.startswith("_") and f.__module__ == module.__name__
    ]


def tools_from_module(module: types.ModuleType) -> list[FunctionTool]:
    tools = []
    for fn in module_functions(module):
        overrides = getattr(fn, TOOL_MARK, {})
        tools.append(FunctionTool(fn, **overrides))
    return tools


def register_module(registry: ToolRegistry, spec: str) -> list[FunctionTool]:
    """Import `spec` (`--tools` value) and register its tools; returns them."""
    tools = tools_from_module(load_module(spec))
    if not tools:
        raise ToolRegistrationError(f"--tools {spec}: the module defines no public functions")
    registry.extend(tools)
    return tools
