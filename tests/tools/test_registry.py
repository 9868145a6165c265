"""Tool registry and Python-function tools: schemas from hints/docstrings, module loading."""

from __future__ import annotations

import asyncio
import enum
import sys
import textwrap
from typing import Annotated, Any, Literal, Optional

import pytest

from agentcpu.tools.executor import ToolExecutor
from agentcpu.tools.python_tools import FunctionTool, parse_docstring, register_module, tool
from agentcpu.tools.registry import (
    Tool,
    ToolArgumentsError,
    ToolOutputError,
    ToolRegistrationError,
    ToolRegistry,
    UnknownToolError,
    to_content,
)


def forecast(
    city: str,
    days: int = 3,
    units: Literal["c", "f"] = "c",
    tags: list[str] | None = None,
    weights: dict[str, float] | None = None,
    exact: Optional[bool] = None,  # noqa: UP045 - the Optional spelling is under test
) -> str:
    """Weather forecast for a city.

    Uses the latest model run.

    Args:
        city (str): The city name,
            e.g. Paris.
        days: Number of days.
        units: Temperature units.

    Returns:
        The forecast as text.
    """
    return f"{city}:{days}:{units}"


def numpy_style(x: float, y: Annotated[int, "the y value"], *, z: tuple[int, ...] = ()) -> float:
    """Scale a value.

    Parameters
    ----------
    x : float
        The value to scale,
        in metres.
    y : int, optional

    Returns
    -------
    float
    """
    return x * y


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


def no_doc(a, b: set[int], c: tuple[int, str], colour: Colour = Colour.RED, anything: Any = None):
    return a


def test_schema_from_google_docstring_and_hints():
    params = FunctionTool(forecast).parameters
    assert params == {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "The city name, e.g. Paris."},
            "days": {"type": "integer", "description": "Number of days.", "default": 3},
            "units": {
                "type": "string",
                "enum": ["c", "f"],
                "description": "Temperature units.",
                "default": "c",
            },
            "tags": {
                "anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "null"}],
                "default": None,
            },
            "weights": {
                "anyOf": [
                    {"type": "object", "additionalProperties": {"type": "number"}},
                    {"type": "null"},
                ],
                "default": None,
            },
            "exact": {"type": ["boolean", "null"], "default": None},
        },
        "required": ["city"],
        "additionalProperties": False,
    }
    assert (
        FunctionTool(forecast).description
        == "Weather forecast for a city.\n\nUses the latest model run."
    )


def test_schema_from_numpy_docstring_annotated_and_keyword_only():
    t = FunctionTool(numpy_style)
    assert t.description == "Scale a value."
    assert t.parameters["properties"] == {
        "x": {"type": "number", "description": "The value to scale, in metres."},
        "y": {"type": "integer", "description": "the y value"},
        "z": {"type": "array", "items": {"type": "integer"}, "default": []},
    }
    assert t.parameters["required"] == ["x", "y"]


def test_schema_without_docstring_sets_tuples_enums_any():
    t = FunctionTool(no_doc)
    props = t.parameters["properties"]
    assert t.description == ""
    assert props["a"] == {} and props["anything"] == {"default": None}
    assert props["b"] == {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}
    assert props["c"]["prefixItems"] == [{"type": "integer"}, {"type": "string"}]
    assert props["colour"] == {"type": "string", "enum": ["red", "blue"], "default": "red"}
    assert t.parameters["required"] == ["a", "b", "c"]


def test_enum_arguments_arrive_as_members():
    assert (
        FunctionTool(no_doc).call_blocking({"a": 1, "b": [], "c": [1, "x"], "colour": "blue"})
        == "1"
    )

    def pick(colour: Colour) -> str:
        return colour.name

    assert FunctionTool(pick).call_blocking({"colour": "blue"}) == "BLUE"


def test_sphinx_docstring():
    summary, params = parse_docstring("Do it.\n\n:param a: the a\n:param int b: the b\n:returns: x")
    assert summary == "Do it." and params == {"a": "the a", "b": "the b"}


def test_unsupported_signatures_are_refused_with_the_parameter_named():
    def varargs(*xs: int): ...

    def bad_type(x: complex): ...

    def bad_keys(x: dict[int, str]): ...

    with pytest.raises(ToolRegistrationError, match=r"\*args"):
        FunctionTool(varargs)
    with pytest.raises(ToolRegistrationError, match=r"bad_type\.<locals>|bad_type.*\(x\)"):
        FunctionTool(bad_type)
    with pytest.raises(ToolRegistrationError, match="keys are strings"):
        FunctionTool(bad_keys)


def test_registry_register_get_schemas_and_errors():
    reg = ToolRegistry([FunctionTool(forecast)])
    assert reg.names() == ["forecast"] and "forecast" in reg and len(reg) == 1
    (entry,) = reg.schemas()
    assert entry["type"] == "function" and entry["function"]["name"] == "forecast"
    assert entry["function"]["parameters"]["required"] == ["city"]
    with pytest.raises(ToolRegistrationError, match="already registered"):
        reg.register(FunctionTool(forecast))
    reg.register(FunctionTool(forecast), replace=True)
    with pytest.raises(UnknownToolError, match="available: forecast"):
        reg.get("nope")
    with pytest.raises(ToolRegistrationError, match="tool name"):
        reg.register(FunctionTool(forecast, name="has space"))

    broken = Tool()
    broken.name, broken.parameters = "broken", {"type": "object", "properties": {"a": {"type": 5}}}
    with pytest.raises(ToolRegistrationError, match="invalid parameters schema"):
        reg.register(broken)


def test_arguments_are_validated_and_decoded():
    reg = ToolRegistry([FunctionTool(forecast)])
    assert reg.validate_arguments("forecast", '{"city": "Oslo"}') == {"city": "Oslo"}
    with pytest.raises(ToolArgumentsError, match="'city' is a required property"):
        reg.validate_arguments("forecast", {})
    with pytest.raises(ToolArgumentsError, match="at 'units'"):
        reg.validate_arguments("forecast", {"city": "x", "units": "kelvin"})
    with pytest.raises(ToolArgumentsError, match="not valid JSON"):
        reg.validate_arguments("forecast", "{city: x")
    with pytest.raises(ToolArgumentsError, match="JSON object"):
        reg.validate_arguments("forecast", "[1]")


def test_to_content():
    assert to_content("x") == "x" and to_content({"a": [1, 2]}) == '{"a": [1, 2]}'
    assert to_content(None) == "null"
    with pytest.raises(ToolOutputError, match="not JSON-serialisable"):
        to_content({1, 2})


MODULE = '''
"""User tools."""
import asyncio
from os.path import join  # imported: not a tool

def word_count(text: str) -> int:
    """Count words.

    Args:
        text: The text to count.
    """
    return len(text.split())

async def slow_upper(text: str, times: int = 1) -> str:
    """Upper-case after a pause."""
    await asyncio.sleep(0.01)
    return text.upper() * times

def _private(x: int) -> int:
    return x

class NotATool:
    pass
'''


def test_module_file_registered_and_called(tmp_path):
    path = tmp_path / "user_tools.py"
    path.write_text(MODULE)
    reg = ToolRegistry()
    tools = register_module(reg, str(path))
    assert [t.name for t in tools] == ["word_count", "slow_upper"]
    assert tools[0].blocking and not tools[1].blocking
    assert reg.schemas(["word_count"])[0]["function"]["parameters"]["properties"]["text"] == {
        "type": "string",
        "description": "The text to count.",
    }

    async def main():
        async with ToolExecutor(reg, max_workers=2, timeout_s=10) as ex:
            return await asyncio.gather(
                ex.run("word_count", '{"text": "a b c"}'),
                ex.run("slow_upper", {"text": "ab", "times": 2}),
                ex.run("word_count", {"text": 3}),
            )

    counted, upper, invalid = asyncio.run(main())
    assert (counted.ok, counted.content) == (True, "3")
    assert (upper.ok, upper.content) == (True, "ABAB")
    assert not invalid.ok and invalid.content.startswith("error: invalid arguments")


def test_module_selection_all_and_decorator(tmp_path, monkeypatch):
    package = tmp_path / "mytools_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "exported.py").write_text(
        textwrap.dedent("""
        __all__ = ["b"]
        def a() -> int: return 1
        def b() -> int: return 2
    """)
    )
    (package / "marked.py").write_text(
        textwrap.dedent("""
        from agentcpu.tools.python_tools import tool
        def plain() -> int: return 1
        @tool
        def picked() -> int: return 2
        @tool(name="renamed", description="Custom.")
        def other() -> int: return 3
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = ToolRegistry()
    assert [t.name for t in register_module(reg, "mytools_pkg.exported")] == ["b"]
    marked = register_module(reg, "mytools_pkg.marked")
    assert [(t.name, t.description) for t in marked] == [("picked", ""), ("renamed", "Custom.")]
    with pytest.raises(ToolRegistrationError, match="cannot import"):
        register_module(reg, "no_such_module_for_agentcpu")
    with pytest.raises(ToolRegistrationError, match="no such file"):
        register_module(reg, str(tmp_path / "missing.py"))
    for name in [m for m in sys.modules if m.startswith("mytools_pkg")]:
        monkeypatch.delitem(sys.modules, name)


def test_tool_decorator_keeps_function_callable():
    @tool
    def f(x: int) -> int:
        return x + 1

    assert f(1) == 2
