"""End to end through LLMEngine: a random-weight model whose every step is masked by the
constraint still produces output that validates."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from agentcpu.engine.sampling_params import SamplingParams
from agentcpu.structured import build_constraint
from agentcpu.tools.parsers import ToolCallParser
from tests.engine.helpers import make_engine
from tests.models.reference import make_checkpoint
from tests.structured.helpers import output_text, padded
from tests.structured.schemas import FINITE_SCHEMA
from tests.tokenizer.fixtures import make_bpe_tokenizer_dir

MAX_TOKENS = 200
TOOLS = [
    {"type": "function", "function": {"name": "search", "parameters": FINITE_SCHEMA}},
    {
        "type": "function",
        "function": {"name": "noop", "parameters": {"type": "object", "properties": {}}},
    },
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The model is tiny: a second OpenMP thread only adds waiting (50x on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = tmp_path_factory.mktemp("structured-engine")
    make_bpe_tokenizer_dir(path)
    from agentcpu.tokenizer.tokenizer import Tokenizer

    vocab = padded(Tokenizer.from_pretrained(path).vocab_size)  # embedding rows past the tokenizer
    make_checkpoint(path, "qwen2", vocab_size=vocab, num_hidden_layers=2)
    make_bpe_tokenizer_dir(path)  # save_pretrained wrote its own generation_config
    return make_engine(path)


def generate(engine, constraints: list, seed: int = 0) -> list[tuple[list[int], str]]:
    tok = engine.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Find it."}]))
    requests = []
    for i, constraint in enumerate(constraints):
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=seed + i)
        requests.append(engine.add_request(prompt, params, constraint=constraint).request_id)
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = (out.token_ids, out.finish_reason)
    assert all(reason == "stop" for _, reason in done.values())
    return [(done[r][0], output_text(tok, done[r][0])) for r in requests]


def test_json_schema_output_validates(engine):
    tok, vocab = engine.tokenizer, engine.config.model_config.vocab_size
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "step", "schema": FINITE_SCHEMA, "strict": True},
    }
    constraints = [
        build_constraint(
            tok,
            vocab,
            response_format=response_format,
            tools=None,
            tool_choice=None,
            tool_format=None,
        )
        for _ in range(4)
    ]
    for ids, text in generate(engine, constraints):
        assert all(i < tok.vocab_size for i in ids)
        jsonschema.validate(json.loads(text), FINITE_SCHEMA)


def test_named_tool_call_validates(engine):
    tok, vocab = engine.tokenizer, engine.config.model_config.vocab_size
    choice = {"type": "function", "function": {"name": "search"}}
    constraints = [
        build_constraint(
            tok, vocab, response_format=None, tools=TOOLS, tool_choice=choice, tool_format="hermes"
        )
        for _ in range(3)
    ]
    for _, text in generate(engine, constraints, seed=10):
        parser = ToolCallParser("hermes", TOOLS)
        parser.feed(text)
        result = parser.finish()
        assert [c.name for c in result.tool_calls] == ["search"] and result.content is None
        jsonschema.validate(json.loads(result.tool_calls[0].arguments), FINITE_SCHEMA)
