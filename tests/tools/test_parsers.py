"""Tool-call parsers: formats detected from chat templates, and streamed deltas that
reassemble to exactly the non-streamed result."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentcpu.bench.synthetic_tokenizer import CHATML_TEMPLATE
from agentcpu.errors import InvalidRequestError
from agentcpu.tools.parsers import (
    HERMES,
    LLAMA3_JSON,
    MISTRAL,
    TOOL_FORMATS,
    ParsedDelta,
    ParsedResult,
    ToolCallParser,
    detect_tool_format,
)
from tests.tokenizer.templates import LLAMA2_TEMPLATE, LLAMA3_1_TEMPLATE, QWEN2_5_TEMPLATE

MISTRAL_TEMPLATE = (
    "{%- for m in messages %}{%- if m.role == 'assistant' and m.tool_calls %}"
    "{{- '[TOOL_CALLS] ' + (m.tool_calls | tojson) + eos_token }}"
    "{%- else %}[INST] {{ m.content }} [/INST]{%- endif %}{%- endfor %}"
)
CALL_ID = re.compile(r"^call_[0-9a-f]{24}$")


@pytest.mark.parametrize(
    "template, fmt",
    [
        (QWEN2_5_TEMPLATE, HERMES),
        (CHATML_TEMPLATE, HERMES),
        (LLAMA3_1_TEMPLATE, LLAMA3_JSON),
        (MISTRAL_TEMPLATE, MISTRAL),
        (LLAMA2_TEMPLATE, None),
        ("", None),
        (None, None),
    ],
    ids=["qwen2.5", "chatml-synthetic", "llama3.1", "mistral", "llama2", "empty", "none"],
)
def test_detect_tool_format(template, fmt):
    assert detect_tool_format(template) == fmt


def stream(fmt: str, chunks: list[str]) -> tuple[list[ParsedDelta], ParsedResult]:
    parser = ToolCallParser(fmt, [])
    deltas = [parser.feed(chunk) for chunk in chunks] + [parser.flush()]
    return deltas, parser.finish()


def assert_reassembles(deltas: list[ParsedDelta], result: ParsedResult) -> None:
    assert ("".join(d.content for d in deltas) or None) == result.content
    ids, names, arguments = {}, {}, {}
    for d in deltas:
        for call in d.tool_calls:
            if call.index not in ids:  # the first delta of a call names it
                assert call.id is not None and call.name is not None
                assert call.index == len(ids)
                ids[call.index], names[call.index] = call.id, call.name
                arguments[call.index] = ""
            else:
                assert call.id is None and call.name is None
            arguments[call.index] += call.arguments_delta
    assert [(ids[i], names[i], arguments[i]) for i in range(len(ids))] == [
        (c.id, c.name, c.arguments) for c in result.tool_calls
    ]
    assert all(CALL_ID.match(c.id) for c in result.tool_calls)
    assert len({c.id for c in result.tool_calls}) == len(result.tool_calls)


def chunked(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


# -- examples -------------------------------------------------------------------------------

HERMES_TEXT = (
    'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}\n'
    '</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": "}{", "b": -1.5e3}}\n</tool_call>'
)
EXAMPLES = [
    (
        HERMES,
        HERMES_TEXT,
        "Let me look.",
        [("get_weather", '{"city": "Paris", "days": [1, 2]}'), ("add", '{"a": "}{", "b": -1.5e3}')],
    ),
    (HERMES, "No tools needed <tool here.", "No tools needed <tool here.", []),
    (
        HERMES,
        '<tool_call>\n{"arguments": {"x": true}, "name": "late"}\n</tool_call>\n',
        None,
        [("late", '{"x": true}')],
    ),
    (HERMES, '<tool_call>\n{"name": "noargs"}\n</tool_call>', None, [("noargs", "{}")]),
    (
        HERMES,
        '<tool_call>\n{"name": "s", "arguments": "{\\"q\\": 1}"}\n</tool_call>',
        None,
        [("s", '{"q": 1}')],
    ),
    (HERMES, "<tool_call>\nnot json", "<tool_call>not json", []),
    (
        LLAMA3_JSON,
        '{"name": "f", "parameters": {"x": "y"}}; {"name": "g", "parameters": {}}',
        None,
        [("f", '{"x": "y"}'), ("g", "{}")],
    ),
    (LLAMA3_JSON, '<|python_tag|>{"name": "f", "parameters": {"n": 1}}', None, [("f", '{"n": 1}')]),
    (LLAMA3_JSON, 'Sure: {"name": "f"}', 'Sure: {"name": "f"}', []),
    (LLAMA3_JSON, '{"city": "Paris"}', '{"city": "Paris"}', []),
    (LLAMA3_JSON, "<|python", "<|python", []),
    (
        MISTRAL,
        'ok [TOOL_CALLS] [{"name": "f", "arguments": {"q": "a\\"b"}}, {"name": "g", "arguments": {}}]',
        "ok",
        [("f", '{"q": "a\\"b"}'), ("g", "{}")],
    ),
    (
        MISTRAL,
        '[TOOL_CALLS][{"name": "f", "arguments": {"q": [1, {"r": null}]}}]',
        None,
        [("f", '{"q": [1, {"r": null}]}')],
    ),
    (MISTRAL, "plain [TOOL_CALL", "plain [TOOL_CALL", []),
]


@pytest.mark.parametrize("fmt, text, content, calls", EXAMPLES)
@pytest.mark.parametrize("size", [1, 3, 1000])
def test_examples(fmt, text, content, calls, size):
    deltas, result = stream(fmt, chunked(text, size))
    assert result.content == content
    assert [(c.name, c.arguments) for c in result.tool_calls] == calls
    assert_reassembles(deltas, result)


def test_possible_trigger_is_held_back_until_it_is_not():
    parser = ToolCallParser(HERMES, [])
    assert parser.feed("Hello <tool").content == "Hello"
    assert parser.feed("box> ok").content == " <toolbox> ok"


def test_arguments_stream_before_the_call_is_complete():
    parser = ToolCallParser(HERMES, [])
    first = parser.feed('<tool_call>\n{"name": "search", "arguments": {"query": "cpu inf')
    assert first.content == "" and first.tool_calls[0].name == "search"
    assert first.tool_calls[0].arguments_delta == '{"query": "cpu inf'
    more = parser.feed('erence"}}\n</tool_call>')
    assert [d.arguments_delta for d in more.tool_calls] == ['erence"}']
    assert more.tool_calls[0].id is None


def test_cut_off_call_keeps_what_arrived():
    _, result = stream(MISTRAL, ['[TOOL_CALLS] [{"name": "f", "arguments": {"q": "trunc'])
    assert result.content is None
    assert [(c.name, c.arguments) for c in result.tool_calls] == [("f", '{"q": "trunc')]


def test_finish_is_final():
    parser = ToolCallParser(HERMES, [])
    parser.feed("hi")
    assert parser.finish() == parser.finish()
    with pytest.raises(InvalidRequestError):
        parser.feed("more")


def test_unknown_format():
    with pytest.raises(InvalidRequestError, match="unknown tool-call format"):
        ToolCallParser("xml", [])


# -- generated ------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)
arguments = st.dictionaries(st.text(max_size=8), json_values, max_size=4)
names = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_.-]{0,15}", fullmatch=True)
calls = st.lists(st.tuples(names, arguments), max_size=3)
separators = st.sampled_from([(", ", ": "), (",", ":")])
TRIGGER_PARTS = ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>", "</tool_call>")
content = st.text(max_size=30).filter(lambda t: not any(p in t for p in TRIGGER_PARTS))


def render(fmt: str, text: str, made: list, seps) -> tuple[str, str | None, list]:
    """(output text, expected content, expected [(name, arguments text)])."""
    key = "parameters" if fmt == LLAMA3_JSON else "arguments"
    args = [json.dumps(a, separators=seps) for _, a in made]
    objects = [
        '{"name": ' + json.dumps(n) + f', "{key}": ' + a + "}"
        for (n, _), a in zip(made, args, strict=True)
    ]
    expected = [(n, a) for (n, _), a in zip(made, args, strict=True)]
    if not made:
        return text, (text or None), []
    if fmt == HERMES:
        blocks = "\n".join(f"<tool_call>\n{o}\n</tool_call>" for o in objects)
        lead = text.rstrip(" \t\r\n")
        return f"{text}\n{blocks}", lead or None, expected
    if fmt == MISTRAL:
        lead = text.rstrip(" \t\r\n")
        return f"{text} [TOOL_CALLS] [" + ", ".join(objects) + "]", lead or None, expected
    return "; ".join(objects), None, expected


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fmt=st.sampled_from(TOOL_FORMATS), text=content, made=calls, seps=separators, data=st.data())
def test_streaming_matches_whole_output(fmt, text, made, seps, data):
    if fmt == LLAMA3_JSON and text.startswith("{"):
        text = "x" + text  # an output opening with `{` is a call in this format
    output, expected_content, expected_calls = render(fmt, text, made, seps)
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(output) - 1)), max_size=12)))
    chunks = [output[a:b] for a, b in zip([0, *cuts], [*cuts, len(output)], strict=True)]
    deltas, result = stream(fmt, chunks)
    assert_reassembles(deltas, result)
    assert [(c.name, c.arguments) for c in result.tool_calls] == expected_calls
    assert result.content == expected_content
    whole = stream(fmt, [output])[1]
    assert (whole.content, [(c.name, c.arguments) for c in whole.tool_calls]) == (
        result.content,
        [(c.name, c.arguments) for c in result.tool_calls],
    )


def test_call_broken_after_its_name_keeps_what_was_streamed():
    deltas, result = stream(HERMES, ['<tool_call>\n{"name": "f", "arguments": {"a": 1}] oops'])
    assert [(c.name, c.arguments) for c in result.tool_calls] == [("f", '{"a": 1}')]
    assert_reassembles(deltas, result)


def test_long_arguments_stream_in_linear_time():
    import time

    body = json.dumps({"content": "x" * 50_000})
    text = '<tool_call>\n{"name": "write_file", "arguments": ' + body + "}\n</tool_call>"
    start = time.perf_counter()
    deltas, result = stream(HERMES, chunked(text, 4))
    assert time.perf_counter() - start < 10  # quadratic copying would take minutes
    assert result.tool_calls[0].arguments == body
    assert_reassembles(deltas, result)
