"""Lark grammars (llguidance's dialect) for JSON answers and each family's tool calls.

JSON is written as `json.dumps` writes it (", " and ": " separators, no other
whitespace), which is also how chat templates render tool calls, so constrained output
stays in the distribution the model was trained on. A tool call's name is a literal and
its arguments an inline `%json` schema. Delimiters that are single added tokens of the
vocabulary (`<tool_call>`, `[TOOL_CALLS]`, `<|python_tag|>`) are written as those tokens.

In "auto" mode the text before a call is free (any valid UTF-8); a trigger ends it,
whether the model writes it as its token or spells it out, and the call after it is
constrained.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from agentcpu.errors import InvalidRequestError
from agentcpu.structured.schema import AUTO, NAMED, ToolSpec
from agentcpu.tools.parsers import (
    HERMES,
    HERMES_CLOSE,
    HERMES_OPEN,
    LLAMA3_JSON,
    LLAMA3_PYTHON_TAG,
    MISTRAL,
    MISTRAL_TRIGGER,
    TOOL_FORMATS,
)

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
FREE_TEXT = r"TEXT: /(.|\n)*/"
# Llama 3: an answer is text unless it opens with `{` or <|python_tag|> (then it is calls).
LLAMA3_TEXT = r"TEXT: /([^{<](.|\n)*)?/ | /<(.|\n)*/ & ~/<\|python_tag\|>(?s:.*)/"
ARGUMENT_KEY = {HERMES: "arguments", LLAMA3_JSON: "parameters", MISTRAL: "arguments"}

# A delimiter's lark expression: its token `<[id]>` when it is one added token, else text.
Delimiter = Callable[[str], str]


def json_rule(schema: dict, lenient: bool) -> str:
    options = {**JSON_OPTIONS, "lenient": lenient}
    return "%json " + json.dumps({**schema, "x-guidance": options})


def json_grammar(schema: dict, lenient: bool) -> str:
    return f"start: {json_rule(schema, lenient)}\n"


def tool_grammar(
    fmt: str,
    mode: str,
    tools: list[ToolSpec],
    delimiter: Delimiter,
    answer_schema: dict | None = None,
    answer_strict: bool = False,
) -> str:
    """Calls in `fmt`. `mode` required / named: the output is only calls (named: one).
    auto: free text (or a JSON answer matching `answer_schema`), or calls."""
    if fmt not in TOOL_FORMATS:
        raise InvalidRequestError(f"unknown tool-call format {fmt!r}; known: {TOOL_FORMATS}")
    rules = _function_rules(fmt, tools)
    rules += _FORMATS[fmt](mode, delimiter, answer_schema, not answer_strict)
    return "\n".join(rules) + "\n"


def _function_rules(fmt: str, tools: list[ToolSpec]) -> list[str]:
    key = ARGUMENT_KEY[fmt]
    rules = ["call: " + " | ".join(f"fn_{i}" for i in range(len(tools)))]
    for i, tool in enumerate(tools):
        head = '{"name": ' + json.dumps(tool.name) + f', "{key}": '
        rules.append(f"fn_{i}: {json.dumps(head)} args_{i} " + '"}"')
        rules.append(f"args_{i}: {json_rule(tool.parameters, lenient=not tool.strict)}")
    return rules


def _answer(answer_schema: dict | None, lenient: bool, text_rule: str) -> list[str]:
    if answer_schema is None:
        return ["answer: TEXT", text_rule]
    return [f"answer: {json_rule(answer_schema, lenient)}"]


def _triggered(trigger: str, delimiter: Delimiter, free_text: bool) -> list[str]:
    """`lead`: the text before a call and its trigger, token or spelled out."""
    token = delimiter(trigger)
    spelled = f"lead_spelled[lazy]: TEXT {json.dumps(trigger)}"
    if not free_text:
        return [f"lead: {token}"]
    if token.startswith("<["):
        return [f"lead: TEXT {token} | lead_spelled", spelled]
    return ["lead: lead_spelled", spelled]


def _hermes(
    mode: str, delimiter: Delimiter, answer_schema: dict | None, lenient: bool
) -> list[str]:
    close = f'"\\n" {delimiter(HERMES_CLOSE)}'
    rules = [f'body: "\\n" call {close}', f"block: {delimiter(HERMES_OPEN)} body"]
    more = "" if mode == NAMED else ' ("\\n" block)*'
    if mode != AUTO:
        return [f"start: block{more}", *rules]
    rules += _answer(answer_schema, lenient, FREE_TEXT)
    rules += _triggered(HERMES_OPEN, delimiter, answer_schema is None)
    return [f"start: answer | lead body{more}", *rules]


def _mistral(
    mode: str, delimiter: Delimiter, answer_schema: dict | None, lenient: bool
) -> list[str]:
    more = "" if mode == NAMED else ' (", " call)*'
    rules = [f'calls: " "? "[" call{more} "]"']
    if mode != AUTO:
        return [f"start: {delimiter(MISTRAL_TRIGGER)} calls", *rules]
    rules += _answer(answer_schema, lenient, FREE_TEXT)
    rules += _triggered(MISTRAL_TRIGGER, delimiter, answer_schema is None)
    return ["start: answer | lead calls", *rules]


def _llama3(
    mode: str, delimiter: Delimiter, answer_schema: dict | None, lenient: bool
) -> list[str]:
    more = "" if mode == NAMED else ' ("; " call)*'
    if mode != AUTO:
        return [f"start: call{more}"]
    tag = delimiter(LLAMA3_PYTHON_TAG)
    tagged = f" | {tag} call{more}" if tag.startswith("<[") else ""
    if answer_schema is not None:  # a JSON answer and a call both open with `{`
        return [f"start: answer{tagged}", *_answer(answer_schema, lenient, LLAMA3_TEXT)]
    return [f"start: answer | call{more}{tagged}", *_answer(None, lenient, LLAMA3_TEXT)]


_FORMATS = {HERMES: _hermes, MISTRAL: _mistral, LLAMA3_JSON: _llama3}
