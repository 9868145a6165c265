import pytest

from agentcpu.demo.tools import (
    CITIES,
    TOOL_FUNCTIONS,
    TOOL_SCHEMAS,
    calculator,
    convert_units,
    days_between,
    format_number,
    get_weather,
    run_tool,
)


@pytest.mark.parametrize(("expression", "expected"), [
    ("123 * 4", 492), ("(98 + 84) / 27", 6.74), ("2 ** 10", 1024), ("-3.5 + 1", -2.5),
    ("10 / 4", 2.5), ("7 - 10", -3), ("(1 + 2) * (3 + 4)", 21),
])
def test_calculator_computes(expression, expected):
    assert calculator(expression) == {"result": expected}


@pytest.mark.parametrize("expression", [
    "__import__('os')", "1 / 0", "2 ** 1000", "abs(-1)", "x + 1", "", "1 +",
])
def test_calculator_refuses_what_is_not_arithmetic(expression):
    assert "error" in calculator(expression)


@pytest.mark.parametrize(("value", "src", "dst", "expected"), [
    (12, "km", "mi", 7.46), (100, "C", "F", 212), (32, "F", "C", 0), (0, "C", "K", 273.15),
    (1, "kg", "lb", 2.2), (1, "gal", "l", 3.79), (1, "mi", "ft", 5280), (500, "ml", "cup", 2.11),
])
def test_convert_units(value, src, dst, expected):
    assert convert_units(value, src, dst) == {"result": expected}


def test_convert_units_rejects_mixed_dimensions_and_unknown_units():
    assert "error" in convert_units(1, "kg", "km")
    assert "error" in convert_units(1, "parsec", "km")


def test_weather_table_is_deterministic_and_case_insensitive():
    assert len(CITIES) >= 300
    row = get_weather("Oslo")
    assert get_weather("oslo") == row
    assert set(row) == {"city", "temperature_c", "condition", "humidity"}
    assert "error" in get_weather("Atlantis-on-Sea")


def test_days_between():
    assert days_between("2024-01-01", "2024-03-01") == {"days": 60}
    assert days_between("2024-03-01", "2024-01-01") == {"days": -60}
    assert "error" in days_between("yesterday", "2024-01-01")


def test_format_number():
    assert [format_number(x) for x in (492.0, 7.456, 2.5, -3.0, 0.001)] == [
        "492", "7.46", "2.5", "-3", "0"]


def test_schemas_match_functions_and_run_tool_reports_errors():
    assert [s["function"]["name"] for s in TOOL_SCHEMAS] == list(TOOL_FUNCTIONS)
    assert run_tool("calculator", {"expression": "1 + 1"}) == {"result": 2}
    assert "error" in run_tool("nope", {})
    assert "error" in run_tool("calculator", {"expr": "1"})
    assert "error" in run_tool("calculator", ["1"])
