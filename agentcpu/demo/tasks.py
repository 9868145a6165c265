"""Seeded task generator for the demo agent, shared by data generation, evaluation and
`agentcpu demo`.

A `Task` is a user message, the tool-call rounds a good agent makes (each round is one
assistant turn, possibly with parallel calls), the reference final reply, and the string
that a correct final reply must contain (`check_answer`).
"""

from __future__ import annotations

import datetime as dt
import json
import random
import re
from dataclasses import dataclass, field
from typing import Any

from agentcpu.demo.tools import (
    CITIES,
    TOOL_SCHEMAS,
    UNITS,
    WEATHER_TABLE,
    calculator,
    convert_units,
    days_between,
    format_number,
    get_weather,
    run_tool,
    tool_result_text,
)

__all__ = [
    "SYSTEM_PROMPT", "TOOL_SCHEMAS", "Task", "ToolCall", "calculator", "check_answer",
    "convert_units", "days_between", "generate_task", "generate_tasks", "get_weather",
    "run_tool", "task_messages",
]

SYSTEM_PROMPT = "You are a helpful assistant. Use the tools when they help. Answer briefly."


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class Task:
    kind: str
    user: str
    rounds: list[list[ToolCall]]  # assistant turns that call tools, in order
    final_answer: str  # the reference final reply
    expected: str  # must appear in a correct final reply
    tool_results: list[list[dict[str, Any]]] = field(default_factory=list)

    @property
    def uses_tools(self) -> bool:
        return bool(self.rounds)


# ---------------------------------------------------------------- phrasing helpers

UNIT_NAMES: dict[str, tuple[str, ...]] = {
    "m": ("meters", "m", "metres"), "km": ("kilometers", "km", "kilometres"),
    "cm": ("centimeters", "cm"), "mi": ("miles", "mi"), "ft": ("feet", "ft"),
    "in": ("inches", "in"), "kg": ("kilograms", "kg", "kilos"), "g": ("grams", "g"),
    "lb": ("pounds", "lb", "lbs"), "oz": ("ounces", "oz"), "l": ("liters", "litres", "l"),
    "ml": ("milliliters", "ml"), "gal": ("gallons", "gal"), "cup": ("cups",),
    "C": ("Celsius", "degrees Celsius", "C"), "F": ("Fahrenheit", "degrees Fahrenheit", "F"),
    "K": ("Kelvin", "K"),
}
WORD_OPERATORS = {"+": ("plus",), "-": ("minus",), "*": ("times", "multiplied by"),
                  "/": ("divided by",)}


def _pick(rng: random.Random, options: tuple[str, ...] | list[str]) -> str:
    return options[rng.randrange(len(options))]


def _number(rng: random.Random, low: int, high: int, decimal_chance: float = 0.25) -> str:
    if rng.random() < decimal_chance:
        return format_number(rng.uniform(low, high))
    return str(rng.randint(low, high))


def _json_number(text: str) -> int | float:
    return float(text) if "." in text else int(text)


def _date(rng: random.Random) -> dt.date:
    return dt.date(2020, 1, 1) + dt.timedelta(days=rng.randrange(0, 3650))


# ---------------------------------------------------------------- task kinds

def _calc_expression(rng: random.Random) -> tuple[str, str]:
    """(expression for the tool, how the user says it)."""
    shape = rng.random()
    if shape < 0.55:
        op = _pick(rng, ("+", "-", "*", "/"))
        a, b = _number(rng, 1, 999, 0.2), _number(rng, 1, 99 if op in "*/" else 999, 0.15)
        expression = f"{a} {op} {b}"
        spoken = f"{a} {_pick(rng, WORD_OPERATORS[op])} {b}" if rng.random() < 0.35 else expression
        return expression, spoken
    if shape < 0.85:
        op1, op2 = _pick(rng, ("+", "-")), _pick(rng, ("*", "/"))
        a, b, c = (_number(rng, 1, 99, 0.1) for _ in range(3))
        expression = f"({a} {op1} {b}) {op2} {c}" if rng.random() < 0.5 else f"{a} {op2} {b} {op1} {c}"
        return expression, expression
    base, exponent = rng.randint(2, 12), rng.randint(2, 6)
    spoken = f"{base} to the power of {exponent}" if rng.random() < 0.5 else f"{base} ** {exponent}"
    return f"{base} ** {exponent}", spoken


def _task_calculate(rng: random.Random) -> Task:
    expression, spoken = _calc_expression(rng)
    result = calculator(expression)
    if "error" in result:
        return _task_calculate(rng)
    value = format_number(result["result"])
    user = _pick(rng, ("What is {e}?", "Calculate {e}.", "what's {e}", "Compute {e} please.",
                       "How much is {e}?", "Can you work out {e}?", "{e} = ?")).format(e=spoken)
    return Task("calculate", user, [[ToolCall("calculator", {"expression": expression})]],
                f"{expression} = {value}", f"= {value}", [[result]])


def _conversion(rng: random.Random) -> tuple[str, str, str]:
    from_unit = _pick(rng, list(UNITS))
    dimension = UNITS[from_unit][0]
    to_unit = _pick(rng, [u for u, (d, _) in UNITS.items() if d == dimension and u != from_unit])
    return from_unit, to_unit, _number(rng, -40 if dimension == "temperature" else 1, 500, 0.3)


def _task_convert(rng: random.Random) -> Task:
    from_unit, to_unit, value = _conversion(rng)
    result = convert_units(_json_number(value), from_unit, to_unit)
    answer = format_number(result["result"])
    a, b = _pick(rng, UNIT_NAMES[from_unit]), _pick(rng, UNIT_NAMES[to_unit])
    user = _pick(rng, ("Convert {v} {a} to {b}.", "How many {b} is {v} {a}?",
                       "What is {v} {a} in {b}?", "{v} {a} to {b} please",
                       "Please convert {v} {a} into {b}.")).format(v=value, a=a, b=b)
    call = ToolCall("convert_units",
                    {"value": _json_number(value), "from_unit": from_unit, "to_unit": to_unit})
    return Task("convert", user, [[call]], f"{value} {from_unit} is {answer} {to_unit}.",
                f"{answer} {to_unit}", [[result]])


def _weather_sentence(city: str, row: dict[str, Any]) -> str:
    return (f"The weather in {city} is {row['temperature_c']}°C and {row['condition']},"
            f" with {row['humidity']}% humidity.")


def _task_weather(rng: random.Random) -> Task:
    city = _pick(rng, CITIES)
    row = get_weather(city)
    user = _pick(rng, ("What's the weather in {c}?", "How is the weather in {c} today?",
                       "weather in {c}", "Tell me the weather for {c}.",
                       "Is it warm in {c} right now?", "What is the temperature in {c}?"))
    return Task("weather", user.format(c=city), [[ToolCall("get_weather", {"city": city})]],
                _weather_sentence(city, row), f"{row['temperature_c']}°C and {row['condition']}",
                [[row]])


def _unknown_city(rng: random.Random) -> str:
    while True:
        name = "".join(_pick(rng, ("zor", "bax", "quel", "mip", "trun", "yaf", "glo", "sne"))
                       for _ in range(2)).capitalize()
        if name not in WEATHER_TABLE:
            return name


def _task_unknown_city(rng: random.Random) -> Task:
    city = _unknown_city(rng)
    result = get_weather(city)
    user = _pick(rng, ("What's the weather in {c}?", "weather in {c}",
                       "How is the weather in {c} today?")).format(c=city)
    return Task("unknown_city", user, [[ToolCall("get_weather", {"city": city})]],
                f"Sorry, I don't have weather data for {city}.", "don't have weather data",
                [[result]])


def _task_compare(rng: random.Random) -> Task:
    first, second = rng.sample(CITIES, 2)
    rows = [get_weather(first), get_weather(second)]
    if rows[0]["temperature_c"] == rows[1]["temperature_c"]:
        return _task_compare(rng)
    named = [{"city": city, **row} for city, row in zip((first, second), rows, strict=True)]
    warm, cold = sorted(named, key=lambda r: -r["temperature_c"])
    if rng.random() < 0.6:
        user = _pick(rng, ("Which is warmer, {a} or {b}?", "Is it warmer in {a} or in {b}?",
                           "Compare the weather in {a} and {b}. Which is warmer?"))
        answer = (f"{warm['city']} is warmer: {warm['temperature_c']}°C versus"
                  f" {cold['temperature_c']}°C in {cold['city']}.")
        expected = f"{warm['city']} is warmer"
    else:
        user = _pick(rng, ("Which is colder, {a} or {b}?", "Is it colder in {a} or in {b}?"))
        answer = (f"{cold['city']} is colder: {cold['temperature_c']}°C versus"
                  f" {warm['temperature_c']}°C in {warm['city']}.")
        expected = f"{cold['city']} is colder"
    calls = [ToolCall("get_weather", {"city": first}), ToolCall("get_weather", {"city": second})]
    return Task("compare", user.format(a=first, b=second), [calls], answer, expected, [rows])


def _task_weather_fahrenheit(rng: random.Random) -> Task:
    city = _pick(rng, CITIES)
    row = get_weather(city)
    target = _pick(rng, ("F", "K"))
    converted = convert_units(row["temperature_c"], "C", target)
    value = format_number(converted["result"])
    user = _pick(rng, ("What is the temperature in {c} in {u}?",
                       "How warm is it in {c}, in {u}?",
                       "Tell me the temperature in {c} in degrees {u}.")).format(
        c=city, u={"F": "Fahrenheit", "K": "Kelvin"}[target])
    rounds = [[ToolCall("get_weather", {"city": city})],
              [ToolCall("convert_units",
                        {"value": row["temperature_c"], "from_unit": "C", "to_unit": target})]]
    return Task("weather_convert", user, rounds, f"It is {value} {target} in {city}.",
                f"{value} {target}", [[row], [converted]])


def _task_convert_then_calculate(rng: random.Random) -> Task:
    from_unit, to_unit = _pick(rng, (("mi", "km"), ("km", "mi"), ("lb", "kg"), ("kg", "lb"),
                                     ("gal", "l"), ("l", "gal"), ("ft", "m"), ("oz", "g")))
    value, count = _number(rng, 1, 50, 0.3), rng.randint(2, 12)
    converted = convert_units(_json_number(value), from_unit, to_unit)
    expression = f"{format_number(converted['result'])} * {count}"
    total = calculator(expression)
    answer = format_number(total["result"])
    a, b = _pick(rng, UNIT_NAMES[from_unit]), _pick(rng, UNIT_NAMES[to_unit])
    user = _pick(rng, ("I have {n} items of {v} {a} each. How many {b} is that in total?",
                       "What is {v} {a} in {b}, multiplied by {n}?",
                       "Convert {v} {a} to {b} and multiply by {n}.")).format(
        n=count, v=value, a=a, b=b)
    rounds = [[ToolCall("convert_units",
                        {"value": _json_number(value), "from_unit": from_unit, "to_unit": to_unit})],
              [ToolCall("calculator", {"expression": expression})]]
    return Task("convert_calculate", user, rounds, f"That is {answer} {to_unit} in total.",
                f"{answer} {to_unit}", [[converted], [total]])


def _task_days(rng: random.Random) -> Task:
    start, end = sorted((_date(rng), _date(rng)))
    result = days_between(start.isoformat(), end.isoformat())
    user = _pick(rng, ("How many days are there between {a} and {b}?",
                       "How many days from {a} to {b}?", "Count the days from {a} until {b}.",
                       "days between {a} and {b}?")).format(a=start, b=end)
    call = ToolCall("days_between", {"start": start.isoformat(), "end": end.isoformat()})
    return Task("days", user, [[call]],
                f"There are {result['days']} days between {start} and {end}.",
                f"{result['days']} days", [[result]])


def _task_weeks(rng: random.Random) -> Task:
    start, end = sorted((_date(rng), _date(rng)))
    days = days_between(start.isoformat(), end.isoformat())
    expression = f"{days['days']} / 7"
    weeks = calculator(expression)
    value = format_number(weeks["result"])
    user = _pick(rng, ("How many weeks are there between {a} and {b}?",
                       "How many weeks from {a} to {b}?")).format(a=start, b=end)
    rounds = [[ToolCall("days_between", {"start": start.isoformat(), "end": end.isoformat()})],
              [ToolCall("calculator", {"expression": expression})]]
    return Task("weeks", user, rounds, f"That is {value} weeks.", f"{value} weeks",
                [[days], [weeks]])


GREETINGS = ("Hi!", "Hello", "hey there", "Good morning!", "Hi, who are you?", "Hello!",
             "Hey, how are you?", "Good evening.", "yo", "Hi assistant")
THANKS = ("Thanks!", "Thank you.", "thanks a lot", "Great, thank you!", "Cheers!")
UNANSWERABLE = (
    "Can you book me a flight to {c}?", "What is the stock price of Apple?",
    "Write me a poem about the sea.", "Who will win the next election?",
    "Send an email to my boss.", "Order a pizza for me.", "What is the capital of {c}?",
    "Translate 'hello' into Japanese.", "Play some music.", "What's the news in {c} today?",
    "Set an alarm for 7am.", "Tell me a joke.", "Who wrote Hamlet?",
    "What is the meaning of life?", "Find me a hotel in {c}.",
)
GREETING_REPLY = ("Hello! I can help with math, unit conversions, the weather and dates."
                  " What would you like to know?")
THANKS_REPLY = "You're welcome! Let me know if you need anything else."
REFUSAL_REPLY = ("Sorry, I can't help with that. I can only do math, unit conversions,"
                 " weather lookups and date calculations.")


def _task_greeting(rng: random.Random) -> Task:
    if rng.random() < 0.7:
        return Task("greeting", _pick(rng, GREETINGS), [], GREETING_REPLY, "Hello!")
    return Task("thanks", _pick(rng, THANKS), [], THANKS_REPLY, "You're welcome!")


def _task_refusal(rng: random.Random) -> Task:
    user = _pick(rng, UNANSWERABLE).format(c=_pick(rng, CITIES))
    return Task("refusal", user, [], REFUSAL_REPLY, "Sorry, I can't help with that")


TASK_KINDS = (
    (_task_calculate, 0.16), (_task_convert, 0.13), (_task_weather, 0.12), (_task_days, 0.09),
    (_task_compare, 0.11), (_task_weather_fahrenheit, 0.08), (_task_convert_then_calculate, 0.08),
    (_task_weeks, 0.05), (_task_unknown_city, 0.03), (_task_greeting, 0.07),
    (_task_refusal, 0.08),
)


def generate_task(rng: random.Random) -> Task:
    """One task drawn from the mix of kinds; deterministic given the rng state."""
    makers, weights = zip(*TASK_KINDS, strict=True)
    return rng.choices(makers, weights=weights)[0](rng)


def generate_tasks(seed: int, count: int) -> list[Task]:
    rng = random.Random(seed)
    return [generate_task(rng) for _ in range(count)]


# ---------------------------------------------------------------- messages and checking

def tool_call_message(calls: list[ToolCall], first_id: int) -> dict[str, Any]:
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": f"call_{first_id + i}", "type": "function",
         "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
        for i, c in enumerate(calls)
    ]}


def task_messages(task: Task, system_prompt: str = SYSTEM_PROMPT) -> list[dict[str, Any]]:
    """The reference conversation in OpenAI message form (system ... final assistant)."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": system_prompt},
                                      {"role": "user", "content": task.user}]
    call_id = 0
    for calls, results in zip(task.rounds, task.tool_results, strict=True):
        messages.append(tool_call_message(calls, call_id))
        for i, result in enumerate(results):
            messages.append({"role": "tool", "tool_call_id": f"call_{call_id + i}",
                             "content": tool_result_text(result)})
        call_id += len(calls)
    messages.append({"role": "assistant", "content": task.final_answer})
    return messages


def check_answer(task: Task, final_text: str) -> bool:
    """True when the final reply contains the expected value as a whole token.

    Numbers must not run on into more digits ("492" does not match "4920").
    """
    pattern = r"(?<![\w.])" + re.escape(task.expected) + r"(?![\d])(?!\.\d)"
    return re.search(pattern, final_text or "") is not None
