"""tool_choice required / named / auto: random walks parse into calls whose arguments
validate, in each family's format."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from agentcpu.errors import InvalidRequestError
from agentcpu.structured import build_constraint
from agentcpu.tools.parsers import HERMES_OPEN, MISTRAL_TRIGGER, TOOL_FORMATS, ToolCallParser
from tests.structured.helpers import output_text, padded, random_walk
from tests.structured.schemas import SCHEMAS

TOOLS = [
    {
        "type": "function",
        "function": {"name": f"tool_{name}", "description": name, "parameters": schema},
    }
    for name, schema in sorted(SCHEMAS.items())
]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
WALKS = 12
TRIGGERS = {"hermes": HERMES_OPEN, "mistral": MISTRAL_TRIGGER, "llama3_json": "{"}


def constraint(tokenizer, fmt, tool_choice, tools=TOOLS, response_format=None):
    return build_constraint(
        tokenizer,
        padded(tokenizer.vocab_size),
        response_format=response_format,
        tools=tools,
        tool_choice=tool_choice,
        tool_format=fmt,
    )


def parse(fmt: str, text: str):
    parser = ToolCallParser(fmt, TOOLS)
    parser.feed(text)
    return parser.finish()


def assert_valid_calls(result, names=None):
    for call in result.tool_calls:
        assert call.name in (names or PARAMETERS)
        jsonschema.validate(json.loads(call.arguments), PARAMETERS[call.name])


def named(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}


@pytest.mark.parametrize("fmt", TOOL_FORMATS)
def test_required_gives_only_valid_calls(tokenizers, fmt):
    tok = tokenizers(fmt)
    seen = set()
    for seed in range(WALKS):
        walk = random_walk(constraint(tok, fmt, "required"), tok, padded(tok.vocab_size), seed)
        # Complete only after whole calls; cut there, the output is one or more valid calls.
        ends = walk.complete_lengths()
        assert ends, f"never complete: {walk.text!r}"
        for end in (ends[0], ends[-1]):
            text = output_text(tok, walk.ids[:end])
            result = parse(fmt, text)
            assert result.tool_calls and result.content is None, text
            assert_valid_calls(result)
            seen.update(c.name for c in result.tool_calls)
    assert len(seen) > 1  # the walks pick different tools


@pytest.mark.parametrize("fmt", TOOL_FORMATS)
def test_named_tool_gives_exactly_that_call(tokenizers, fmt):
    tok = tokenizers(fmt)
    for seed, name in enumerate(sorted(PARAMETERS)):
        walk = random_walk(constraint(tok, fmt, named(name)), tok, padded(tok.vocab_size), seed)
        assert walk.finished  # one call, then nothing but EOS may follow
        result = parse(fmt, walk.text)
        assert [c.name for c in result.tool_calls] == [name] and result.content is None
        assert_valid_calls(result, [name])


@pytest.mark.parametrize("fmt", TOOL_FORMATS)
def test_auto_walks_give_text_or_valid_calls(tokenizers, fmt):
    tok = tokenizers(fmt)
    for seed in range(WALKS):
        walk = random_walk(
            constraint(tok, fmt, "auto"), tok, padded(tok.vocab_size), seed, max_steps=250
        )
        end = walk.complete_lengths()[-1]
        assert_valid_calls(parse(fmt, output_text(tok, walk.ids[:end])))


def free_text_tokens(tok) -> list[int]:
    """Ordinary tokens that can open a text: not added tokens, not a UTF-8 continuation."""
    added = set(tok.backend.get_added_tokens_decoder())
    return [
        i
        for i in range(tok.vocab_size)
        if i not in added and "\ufffd" not in tok.decode([i], skip_special_tokens=False)
    ]


@pytest.mark.parametrize("fmt", ["hermes", "mistral"])
def test_auto_is_free_until_the_trigger_then_constrained(tokenizers, fmt):
    tok = tokenizers(fmt)
    vocab = padded(tok.vocab_size)
    c = constraint(tok, fmt, "auto", tools=TOOLS[:2])
    text_ids = free_text_tokens(tok)
    for token in tok.encode("Let me check that for you.")[:4]:
        mask = c.allowed_mask(vocab)
        assert mask[text_ids].all() and mask[sorted(tok.eos_token_ids)].all()
        c.accept(token)
    trigger = tok.token_to_id(TRIGGERS[fmt])
    assert c.allowed_mask(vocab)[trigger]
    c.accept(trigger)
    constrained = c.allowed_mask(vocab)
    assert constrained.sum() < 5 and not constrained[sorted(tok.eos_token_ids)].any()


def test_auto_spelled_out_trigger_is_constrained_too(qwen):
    vocab = padded(qwen.vocab_size)
    c = constraint(qwen, "hermes", "auto", tools=TOOLS[:1])
    for part in ["Sure", " <", "tool", "_", "call", ">"]:
        for token in qwen.encode(part):
            assert c.allowed_mask(vocab)[token]
            c.accept(token)
    assert c.allowed_mask(vocab).sum() == 1  # the newline before the call object


def test_llama3_auto_text_cannot_open_with_a_brace(tokenizers):
    tok = tokenizers("llama3_json")
    vocab = padded(tok.vocab_size)
    mask = constraint(tok, "llama3_json", "auto").allowed_mask(vocab)
    texts = {i: tok.decode([i], skip_special_tokens=False) for i in free_text_tokens(tok)}
    assert all(mask[i] for i, t in texts.items() if not t.startswith("{"))
    brace_tokens = [i for i, t in texts.items() if t.startswith("{")]
    assert brace_tokens and not all(mask[i] for i in brace_tokens)  # `{"` only, as a call opens


def test_auto_with_json_answer_gives_json_or_calls(qwen):
    schema = SCHEMAS["enum"]
    response_format = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
    for seed in range(6):
        c = constraint(qwen, "hermes", "auto", tools=TOOLS[:3], response_format=response_format)
        walk = random_walk(c, qwen, padded(qwen.vocab_size), seed)
        result = parse("hermes", output_text(qwen, walk.ids[: walk.complete_lengths()[0]]))
        if result.tool_calls:
            assert result.content is None
            assert_valid_calls(result)
        else:
            jsonschema.validate(json.loads(result.content), schema)


def test_none_and_no_tools_mean_no_constraint(qwen):
    assert constraint(qwen, "hermes", "none") is None
    assert constraint(qwen, "hermes", "auto", tools=None) is None
    assert constraint(qwen, None, "auto") is None  # no known format: calls cannot be parsed


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(fmt=None, tool_choice="required"), "no known tool-call format"),
        (dict(fmt="hermes", tool_choice=named("nope")), "not in tools"),
        (dict(fmt="hermes", tool_choice="required", tools=None), "needs at least one tool"),
        (dict(fmt="hermes", tool_choice="sometimes"), "tool_choice must be"),
        (dict(fmt="yaml", tool_choice="required"), "unknown tool-call format"),
        (
            dict(fmt="hermes", tool_choice="auto", tools=[{"type": "function", "function": {}}]),
            "name",
        ),
        (
            dict(
                fmt="hermes",
                tool_choice="auto",
                tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": 7}}}],
            ),
            "tools[0].function.parameters is not a valid JSON schema",
        ),
    ],
)
def test_bad_tool_requests_are_request_errors(qwen, kwargs, words):
    with pytest.raises(InvalidRequestError) as e:
        constraint(qwen, **kwargs)
    assert words in str(e.value)


def test_mask_never_allows_padding_ids(qwen):
    vocab = padded(qwen.vocab_size) + 64
    c = build_constraint(
        qwen, vocab, response_format=None, tools=TOOLS, tool_choice="auto", tool_format="hermes"
    )
    mask = c.allowed_mask(vocab)
    assert mask.shape == (vocab,) and not mask[qwen.vocab_size :].any()
    assert isinstance(mask, torch.Tensor)
