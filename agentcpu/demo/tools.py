"""The demo agent's tools: real implementations and their OpenAI-style JSON schemas.

Every tool takes JSON-able keyword arguments and returns a JSON-able dict; errors are
returned as ``{"error": "..."}`` so the model can read them, never raised past `run_tool`.
"""

from __future__ import annotations

import ast
import datetime as dt
import json
import operator
import random
from collections.abc import Callable
from typing import Any

DECIMALS = 2
MAX_EXPRESSION_CHARS = 200
MAX_EXPONENT = 64
MAX_ABS_RESULT = 1e15
WEATHER_TABLE_SEED = 20240601
FICTIONAL_CITY_COUNT = 220
WEATHER_CONDITIONS = (
    "sunny", "cloudy", "rainy", "snowy", "windy", "foggy", "partly cloudy", "stormy",
)


def format_number(value: float) -> str:
    """Round to DECIMALS places and print without trailing zeros ("7.5", "492", "-3.25")."""
    rounded = round(float(value), DECIMALS)
    if rounded == int(rounded):
        return str(int(rounded))
    return f"{rounded:.{DECIMALS}f}".rstrip("0").rstrip(".")


def number_value(value: float) -> int | float:
    """The JSON number a tool returns: an int when whole, else rounded to DECIMALS."""
    text = format_number(value)
    return float(text) if "." in text else int(text)


# ---------------------------------------------------------------- calculator

_BINARY_OPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
    ast.Mod: operator.mod,
}
_UNARY_OPS: dict[type, Callable[[Any], Any]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
        return _UNARY_OPS[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ValueError("exponent too large")
        result = _BINARY_OPS[type(node.op)](left, right)
        if isinstance(result, complex) or abs(result) > MAX_ABS_RESULT:
            raise ValueError("result out of range")
        return result
    raise ValueError("unsupported expression")


def calculator(expression: str) -> dict[str, Any]:
    """Evaluate arithmetic (+ - * / % ** and parentheses) without eval()."""
    expression = str(expression).strip()
    if not expression or len(expression) > MAX_EXPRESSION_CHARS:
        return {"error": "invalid expression"}
    try:
        value = _evaluate(ast.parse(expression, mode="eval"))
    except ZeroDivisionError:
        return {"error": "division by zero"}
    except (SyntaxError, ValueError, TypeError, OverflowError) as exc:
        return {"error": f"invalid expression: {exc}"}
    return {"result": number_value(value)}


# ---------------------------------------------------------------- unit conversion

# unit -> (dimension, factor to the dimension's base unit); temperature is affine.
UNITS: dict[str, tuple[str, float]] = {
    "m": ("length", 1.0),
    "km": ("length", 1000.0),
    "cm": ("length", 0.01),
    "mi": ("length", 1609.344),
    "ft": ("length", 0.3048),
    "in": ("length", 0.0254),
    "kg": ("mass", 1.0),
    "g": ("mass", 0.001),
    "lb": ("mass", 0.45359237),
    "oz": ("mass", 0.028349523125),
    "l": ("volume", 1.0),
    "ml": ("volume", 0.001),
    "gal": ("volume", 3.785411784),
    "cup": ("volume", 0.2365882365),
    "C": ("temperature", 1.0),
    "F": ("temperature", 1.0),
    "K": ("temperature", 1.0),
}


def _to_celsius(value: float, unit: str) -> float:
    return {"C": value, "F": (value - 32.0) * 5.0 / 9.0, "K": value - 273.15}[unit]


def _from_celsius(value: float, unit: str) -> float:
    return {"C": value, "F": value * 9.0 / 5.0 + 32.0, "K": value + 273.15}[unit]


def convert_units(value: float, from_unit: str, to_unit: str) -> dict[str, Any]:
    """Convert between units of length, mass, volume or temperature."""
    if from_unit not in UNITS or to_unit not in UNITS:
        return {"error": f"unknown unit; use one of {', '.join(UNITS)}"}
    if UNITS[from_unit][0] != UNITS[to_unit][0]:
        return {"error": f"cannot convert {from_unit} to {to_unit}"}
    try:
        value = float(value)
    except (TypeError, ValueError):
        return {"error": "value must be a number"}
    if UNITS[from_unit][0] == "temperature":
        result = _from_celsius(_to_celsius(value, from_unit), to_unit)
    else:
        result = value * UNITS[from_unit][1] / UNITS[to_unit][1]
    return {"result": number_value(result)}


# ---------------------------------------------------------------- weather

REAL_CITIES = (
    "Oslo", "Lima", "Paris", "Tokyo", "Cairo", "Sydney", "Berlin", "Madrid", "Rome", "Vienna",
    "Prague", "Dublin", "Lisbon", "Athens", "Warsaw", "Helsinki", "Stockholm", "Copenhagen",
    "Amsterdam", "Brussels", "Zurich", "Geneva", "Munich", "Hamburg", "Milan", "Naples",
    "Barcelona", "Seville", "Porto", "London", "Manchester", "Edinburgh", "Glasgow", "Toronto",
    "Montreal", "Vancouver", "Chicago", "Boston", "Seattle", "Denver", "Austin", "Dallas",
    "Houston", "Miami", "Atlanta", "Phoenix", "Portland", "New York", "Los Angeles",
    "San Francisco", "Mexico City", "Bogota", "Quito", "Santiago", "Buenos Aires",
    "Montevideo", "Sao Paulo", "Rio de Janeiro", "Havana", "Nairobi", "Lagos", "Accra",
    "Dakar", "Casablanca", "Tunis", "Addis Ababa", "Cape Town", "Johannesburg", "Istanbul",
    "Ankara", "Tehran", "Dubai", "Doha", "Riyadh", "Karachi", "Delhi", "Mumbai", "Bangalore",
    "Chennai", "Kolkata", "Dhaka", "Kathmandu", "Bangkok", "Hanoi", "Manila", "Jakarta",
    "Singapore", "Kuala Lumpur", "Seoul", "Busan", "Beijing", "Shanghai", "Hong Kong",
    "Taipei", "Osaka", "Kyoto", "Melbourne", "Perth", "Auckland", "Wellington", "Reykjavik",
    "Tallinn", "Riga", "Vilnius", "Kyiv", "Bucharest", "Sofia", "Belgrade", "Zagreb",
    "Budapest",
)
_SYLLABLES = (
    "ka", "lo", "ver", "an", "mi", "dor", "el", "sta", "ri", "bel", "no", "tha", "gra", "mon",
    "se", "li", "var", "tor", "ben", "qua", "zi", "pal", "ro", "fen", "dal", "mar", "os",
    "ten", "wil", "ha", "ne", "ku", "bri", "lan", "sor", "vi", "ca", "del", "ur", "nis",
)


def _fictional_cities(rng: random.Random, count: int, taken: set[str]) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
        if name not in taken and 4 <= len(name) <= 10:
            taken.add(name)
            names.append(name)
    return names


def _build_weather_table() -> dict[str, dict[str, Any]]:
    rng = random.Random(WEATHER_TABLE_SEED)
    cities = list(REAL_CITIES) + _fictional_cities(rng, FICTIONAL_CITY_COUNT, set(REAL_CITIES))
    return {
        city: {"city": city, "temperature_c": rng.randint(-15, 38),
               "condition": rng.choice(WEATHER_CONDITIONS), "humidity": rng.randint(15, 98)}
        for city in cities
    }


WEATHER_TABLE: dict[str, dict[str, Any]] = _build_weather_table()
CITIES: tuple[str, ...] = tuple(WEATHER_TABLE)


def get_weather(city: str) -> dict[str, Any]:
    """Current weather for a city from the demo's fixed table (case-insensitive lookup)."""
    key = str(city).strip().lower()
    for name, row in WEATHER_TABLE.items():
        if name.lower() == key:
            return dict(row)
    return {"error": f"unknown city: {city}"}


# ---------------------------------------------------------------- dates

def days_between(start: str, end: str) -> dict[str, Any]:
    """Days from start to end (ISO dates, YYYY-MM-DD); negative when end is earlier."""
    try:
        start_date, end_date = dt.date.fromisoformat(str(start)), dt.date.fromisoformat(str(end))
    except ValueError:
        return {"error": "dates must be YYYY-MM-DD"}
    return {"days": (end_date - start_date).days}


# ---------------------------------------------------------------- registry and schemas

TOOL_FUNCTIONS: dict[str, Callable[..., dict[str, Any]]] = {
    "calculator": calculator,
    "convert_units": convert_units,
    "get_weather": get_weather,
    "days_between": days_between,
}


def _function(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": properties, "required": required},
    }}


TOOL_SCHEMAS: list[dict[str, Any]] = [
    _function("calculator", "Evaluate an arithmetic expression with + - * / ** and parentheses.",
              {"expression": {"type": "string", "description": "e.g. (12 + 3) * 4"}},
              ["expression"]),
    _function("convert_units", "Convert a value between units of length, mass, volume or temperature.",
              {"value": {"type": "number"},
               "from_unit": {"type": "string", "enum": list(UNITS)},
               "to_unit": {"type": "string", "enum": list(UNITS)}},
              ["value", "from_unit", "to_unit"]),
    _function("get_weather", "Get the current weather in a city.",
              {"city": {"type": "string"}}, ["city"]),
    _function("days_between", "Count the days between two dates.",
              {"start": {"type": "string", "description": "YYYY-MM-DD"},
               "end": {"type": "string", "description": "YYYY-MM-DD"}},
              ["start", "end"]),
]


def run_tool(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """Run one tool by name; bad names or arguments come back as an error dict."""
    function = TOOL_FUNCTIONS.get(name)
    if function is None:
        return {"error": f"unknown tool: {name}"}
    if not isinstance(arguments, dict):
        return {"error": "arguments must be a JSON object"}
    try:
        return function(**arguments)
    except TypeError as exc:
        return {"error": f"bad arguments: {exc}"}


def tool_result_text(result: dict[str, Any]) -> str:
    """The tool message content: compact-ish JSON, as the model sees it."""
    return json.dumps(result, ensure_ascii=False)
