"""response_format: random walks through the constraint always give valid JSON."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
import torch

from agentcpu.errors import InvalidRequestError
from agentcpu.structured import bitmask_to_bool, build_constraint
from agentcpu.structured.compiler import compiler_for
from tests.structured.helpers import output_text, padded, random_walk
from tests.structured.schemas import SCHEMAS

WALKS_PER_SCHEMA = 3


def json_schema_format(schema: dict, strict: bool = True) -> dict:
    return {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": schema, "strict": strict},
    }


def constraint(tokenizer, response_format, vocab=None):
    vocab = vocab or padded(tokenizer.vocab_size)
    return build_constraint(
        tokenizer,
        vocab,
        response_format=response_format,
        tools=None,
        tool_choice=None,
        tool_format=None,
    )


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_random_walks_validate(qwen, name):
    schema = SCHEMAS[name]
    vocab = padded(qwen.vocab_size)
    for seed in range(WALKS_PER_SCHEMA):
        walk = random_walk(constraint(qwen, json_schema_format(schema), vocab), qwen, vocab, seed)
        assert walk.finished, f"{name}: no end after {len(walk.ids)} tokens: {walk.text!r}"
        jsonschema.validate(json.loads(walk.text), schema)
        # EOS is allowed only once the JSON is complete.
        for n in walk.eos_allowed_at:
            jsonschema.validate(json.loads(output_text(qwen, walk.ids[:n])), schema)


def test_json_object_gives_an_object(qwen):
    for seed in range(5):
        walk = random_walk(
            constraint(qwen, {"type": "json_object"}), qwen, padded(qwen.vocab_size), seed
        )
        assert walk.finished
        assert isinstance(json.loads(walk.text), dict)


def test_other_tokenizer_styles(tokenizers):
    schema = SCHEMAS["agent_step"]
    for fmt in ("llama3_json", "mistral"):
        tok = tokenizers(fmt)
        walk = random_walk(
            constraint(tok, json_schema_format(schema)), tok, padded(tok.vocab_size), seed=1
        )
        jsonschema.validate(json.loads(walk.text), schema)


@pytest.mark.parametrize(
    "schema, words",
    [
        ({"type": "strin"}, "not a valid JSON schema"),
        (
            {"type": "object", "properties": {"a": {"type": "integer", "minimum": "zero"}}},
            "properties/a/minimum",
        ),
        ({"type": "object", "required": "a"}, "not a valid JSON schema"),
        ([{"type": "object"}], "must be a JSON schema object"),
    ],
)
def test_invalid_schema_is_a_clear_request_error(qwen, schema, words):
    with pytest.raises(InvalidRequestError, match="response_format.json_schema.schema") as e:
        constraint(qwen, json_schema_format(schema))
    assert words in str(e.value)


def test_unsupported_keyword_fails_only_when_strict(qwen):
    schema = {"type": "object", "properties": {"ids": {"type": "array", "uniqueItems": True}}}
    with pytest.raises(InvalidRequestError, match="uniqueItems"):
        constraint(qwen, json_schema_format(schema, strict=True))
    assert constraint(qwen, json_schema_format(schema, strict=False)) is not None


@pytest.mark.parametrize("response_format", [None, {"type": "text"}])
def test_free_text_has_no_constraint(qwen, response_format):
    assert constraint(qwen, response_format) is None


@pytest.mark.parametrize(
    "response_format", [{"type": "yaml"}, {"type": "json_schema", "json_schema": 3}]
)
def test_bad_response_format(qwen, response_format):
    with pytest.raises(InvalidRequestError, match="response_format"):
        constraint(qwen, response_format)


def test_grammars_and_tokenizer_view_are_compiled_once(qwen):
    vocab = padded(qwen.vocab_size)
    compiler = compiler_for(qwen, vocab)
    schema = {"type": "object", "properties": {"only_here": {"type": "integer"}}}
    constraint(qwen, json_schema_format(schema), vocab)
    misses = compiler._compiled.cache_info().misses
    first = constraint(qwen, json_schema_format(schema), vocab)
    second = constraint(qwen, json_schema_format(schema), vocab)
    assert compiler_for(qwen, vocab) is compiler
    assert compiler._compiled.cache_info().misses == misses
    # Copies of one compiled grammar advance independently.
    first.accept(qwen.encode("{")[0])
    assert not torch.equal(first.allowed_mask(vocab), second.allowed_mask(vocab))


def test_mask_is_sized_to_the_model_vocab(qwen):
    vocab = padded(qwen.vocab_size)
    c = constraint(qwen, {"type": "json_object"}, vocab)
    mask = c.allowed_mask(vocab)
    assert mask.shape == (vocab,) and not mask[qwen.vocab_size :].any()
    allowed = mask.nonzero().view(-1).tolist()
    assert allowed and all(qwen.decode([i]).startswith("{") for i in allowed)


def test_bitmask_to_bool_matches_bit_order():
    rng = np.random.default_rng(0)
    words = torch.from_numpy(
        rng.integers(-(2**31), 2**31, size=40, dtype=np.int64).astype(np.int32)
    )
    expected = [(int(words[i // 32]) >> (i % 32)) & 1 == 1 for i in range(40 * 32)]
    assert bitmask_to_bool(words, 1270).tolist() == expected[:1270]
    longer = bitmask_to_bool(words, 1300)
    assert longer[:1280].tolist() == expected and not longer[1280:].any()


def test_masks_computed_ahead_equal_masks_computed_on_demand(qwen):
    from agentcpu.structured import GrammarConstraint
    from agentcpu.structured.grammar import json_grammar

    vocab = padded(qwen.vocab_size)
    compiler = compiler_for(qwen, vocab)
    text = json_grammar(SCHEMAS["agent_step"], lenient=False)
    ahead = GrammarConstraint(compiler.matcher(text), compiler.n_vocab, compiler.mask_executor)
    on_demand = GrammarConstraint(compiler.matcher(text), compiler.n_vocab)
    walk = random_walk(
        constraint(qwen, json_schema_format(SCHEMAS["agent_step"]), vocab), qwen, vocab, seed=4
    )
    for token in walk.ids:
        assert torch.equal(ahead.allowed_mask(vocab), on_demand.allowed_mask(vocab))
        ahead.accept(token)
        on_demand.accept(token)
        assert ahead.is_finished() == on_demand.is_finished()
    assert ahead.is_finished() and ahead.error is None
