"""Tool calls and structured outputs over HTTP, valid by construction.

Needs `agentcpu.structured.build_constraint` and `agentcpu.tools.parsers` (built beside
the server): without them every test here FAILS (on purpose: not a skip).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import time

import jsonschema
import pytest

from agentcpu.server import ServerSettings
from tests.server.conftest import MODEL_NAME, LiveServer

REQUIRED = {
    "agentcpu.structured": "build_constraint",
    "agentcpu.tools.parsers": "ToolCallParser",
}
MAX_TOKENS = 256
USER = [{"role": "user", "content": "Please call a tool."}]


def _missing() -> list[str]:
    missing = []
    for module, name in REQUIRED.items():
        try:
            if not hasattr(importlib.import_module(module), name):
                missing.append(f"{module}.{name}")
        except ImportError:
            missing.append(module)
    return missing


@pytest.fixture(autouse=True)
def _needs_structured_and_parsers():
    missing = _missing()
    if missing:
        pytest.fail(f"tool-call / structured-output modules are missing: {missing}", pytrace=False)


def _s(maxlen: int = 12) -> dict:
    return {"type": "string", "maxLength": maxlen}


def _obj(props: dict, required: list[str] | None = None) -> dict:
    schema = {"type": "object", "properties": props, "additionalProperties": False}
    schema["required"] = list(props) if required is None else required
    return schema


SCHEMAS: dict[str, dict] = {
    "string": _obj({"city": _s()}),
    "bounded_integer": _obj({"days": {"type": "integer", "minimum": 1, "maximum": 14}}),
    "bounded_number": _obj({"t": {"type": "number", "minimum": -40, "maximum": 50}}),
    "boolean": _obj({"metric": {"type": "boolean"}}),
    "string_enum": _obj({"unit": {"enum": ["celsius", "fahrenheit", "kelvin"]}}),
    "integer_enum": _obj({"level": {"enum": [1, 2, 3]}}),
    "const": _obj(
        {"kind": {"const": "fixed"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}}
    ),
    "nested": _obj({"place": _obj({"city": _s(), "country": _s(8)})}),
    "deeply_nested": _obj(
        {"a": _obj({"b": _obj({"c": {"type": "integer", "minimum": 0, "maximum": 99}})})}
    ),
    "string_array": _obj({"tags": {"type": "array", "items": _s(6), "minItems": 1, "maxItems": 3}}),
    "object_array": _obj(
        {
            "items": {
                "type": "array",
                "maxItems": 2,
                "items": _obj(
                    {"sku": _s(6), "qty": {"type": "integer", "minimum": 1, "maximum": 5}}
                ),
            }
        }
    ),
    "number_array": _obj(
        {
            "xs": {
                "type": "array",
                "maxItems": 4,
                "items": {"type": "number", "minimum": 0, "maximum": 1},
            }
        }
    ),
    "optional_fields": _obj(
        {"q": _s(), "limit": {"type": "integer", "minimum": 1, "maximum": 50}, "lang": _s(4)}, ["q"]
    ),
    "all_optional": _obj(
        {"verbose": {"type": "boolean"}, "page": {"type": "integer", "minimum": 0, "maximum": 3}},
        [],
    ),
    "any_of_scalar": _obj(
        {"id": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 1000}, _s(8)]}}
    ),
    "any_of_objects": _obj({"target": {"anyOf": [_obj({"email": _s()}), _obj({"phone": _s(10)})]}}),
    "nullable": _obj({"note": {"anyOf": [_s(), {"type": "null"}]}}),
    "length_bounds": _obj({"code": {"type": "string", "minLength": 3, "maxLength": 5}}),
    "pattern": _obj({"iso": {"type": "string", "pattern": "^[A-Z]{2}$"}}),
    "refs": {
        "$defs": {
            "point": _obj(
                {
                    "x": {"type": "integer", "minimum": 0, "maximum": 9},
                    "y": {"type": "integer", "minimum": 0, "maximum": 9},
                }
            )
        },
        **_obj({"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}}),
    },
    "no_parameters": _obj({}),
    "mixed": _obj(
        {
            "name": _s(),
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "email": {"anyOf": [_s(), {"type": "null"}]},
            "roles": {"type": "array", "items": {"enum": ["admin", "user"]}, "maxItems": 2},
        },
        ["name", "age"],
    ),
}


def _tool(name: str, schema: dict) -> dict:
    return {
        "type": "function",
        "function": {"name": name, "description": f"tool {name}", "parameters": schema},
    }


@pytest.fixture(scope="module")
def tool_server(model_dir):
    live = LiveServer(
        model_dir, ServerSettings.for_model(MODEL_NAME), max_model_len=1536, kv_cache_gb=0.08
    )
    assert live.state.tool_format == "hermes"
    yield live
    live.stop()


def _validate_calls(message, tools: list[dict]) -> None:
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for call in message.tool_calls:
        assert call.type == "function" and call.id
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


async def _ask_all(client, requests: list[dict]):
    return await asyncio.gather(*(client.chat.completions.create(**r) for r in requests))


def test_required_and_named_calls_validate_for_every_schema(tool_server):
    requests, expected = [], []
    for i, (name, schema) in enumerate(SCHEMAS.items()):
        tools = [_tool(name, schema), _tool("other_tool", SCHEMAS["string"])]
        base = dict(
            model=MODEL_NAME,
            messages=USER,
            tools=tools,
            max_tokens=MAX_TOKENS,
            seed=i,
            temperature=1.0,
        )
        requests += [
            {**base, "tool_choice": "required"},
            {**base, "tool_choice": {"type": "function", "function": {"name": name}}},
        ]
        expected += [None, name]
    client = tool_server.client(async_client=True)
    responses = asyncio.run(_ask_all(client, requests))
    assert len(responses) >= 40
    for request, response, name in zip(requests, responses, expected, strict=True):
        choice = response.choices[0]
        assert choice.finish_reason == "tool_calls", (name, choice)
        assert choice.message.tool_calls, (name, choice)
        if name is not None:
            assert [c.function.name for c in choice.message.tool_calls] == [name]
        _validate_calls(choice.message, request["tools"])


def test_streamed_deltas_reassemble_to_the_same_calls(tool_server):
    client = tool_server.client()
    for i, name in enumerate(("nested", "object_array", "mixed")):
        kwargs = dict(
            model=MODEL_NAME,
            messages=USER,
            tools=[_tool(name, SCHEMAS[name])],
            tool_choice="required",
            max_tokens=MAX_TOKENS,
            seed=100 + i,
            temperature=1.0,
        )
        whole = client.chat.completions.create(**kwargs).choices[0]
        calls: dict[int, dict] = {}
        reasons = []
        for chunk in client.chat.completions.create(**kwargs, stream=True):
            for choice in chunk.choices:
                reasons.append(choice.finish_reason)
                for d in choice.delta.tool_calls or []:
                    call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                    call["id"] = call["id"] or d.id
                    call["name"] += d.function.name or ""
                    call["arguments"] += d.function.arguments or ""
        assert [r for r in reasons if r] == ["tool_calls"] == [whole.finish_reason]
        assert [(c["name"], c["arguments"]) for c in calls.values()] == [
            (c.function.name, c.function.arguments) for c in whole.message.tool_calls
        ]
        assert all(c["id"] for c in calls.values())


def test_auto_gives_text_or_valid_calls(tool_server):
    tools = [_tool(name, SCHEMAS[name]) for name in ("string", "bounded_integer", "mixed")]
    client = tool_server.client()
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=USER, tools=tools, tool_choice="auto", n=4, seed=5, max_tokens=96
    )
    for choice in r.choices:
        if choice.message.tool_calls:
            assert choice.finish_reason in ("tool_calls", "length")
            if choice.finish_reason == "tool_calls":
                _validate_calls(choice.message, tools)
        else:
            assert isinstance(choice.message.content, str) and choice.finish_reason != "tool_calls"


def test_parallel_tool_calls_false_keeps_one_call(tool_server):
    tools = [_tool("string", SCHEMAS["string"]), _tool("boolean", SCHEMAS["boolean"])]
    r = tool_server.client().chat.completions.create(
        model=MODEL_NAME,
        messages=USER,
        tools=tools,
        tool_choice="required",
        parallel_tool_calls=False,
        n=3,
        seed=9,
        max_tokens=MAX_TOKENS,
    )
    for choice in r.choices:
        assert len(choice.message.tool_calls) == 1
        _validate_calls(choice.message, tools)


def test_constrain_tool_calls_false_leaves_the_model_unconstrained(tool_server):
    """The extension that measures a model's own tool-call JSON: with the grammar off, a
    random-weight model asked for a required call writes text, not a call."""
    tools = [_tool("string", SCHEMAS["string"])]
    base = dict(model=MODEL_NAME, messages=USER, tools=tools, tool_choice="required", n=3,
                seed=11, temperature=1.0, max_tokens=24)
    client = tool_server.client()
    constrained = client.chat.completions.create(**base)
    free = client.chat.completions.create(**base, extra_body={"constrain_tool_calls": False})
    assert all(c.message.tool_calls for c in constrained.choices)
    assert not any(c.message.tool_calls for c in free.choices)
    assert all(c.finish_reason == "length" and c.message.content for c in free.choices)


def test_response_format_json_schema_strict_and_json_object(tool_server):
    schema = SCHEMAS["mixed"]
    client = tool_server.client()
    r = client.chat.completions.create(
        model=MODEL_NAME,
        messages=USER,
        max_tokens=MAX_TOKENS,
        n=3,
        seed=11,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": schema, "strict": True},
        },
    )
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), schema)
    r = client.chat.completions.create(
        model=MODEL_NAME,
        messages=USER,
        max_tokens=MAX_TOKENS,
        seed=12,
        response_format={"type": "json_object"},
    )
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_invalid_schema_is_400(tool_server):
    import openai

    client = tool_server.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL_NAME,
            messages=USER,
            max_tokens=8,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "no-such-type"}},
            },
        )
    assert e.value.body["message"]


def test_client_tool_pause_sets_the_next_pin_ttl(tool_server):
    """The gap between a streamed turn's tool call and the request bringing its result is
    learned per tool name; the next tool-offering turn is pinned for 3x that gap."""
    pauses = tool_server.state.tool_pauses
    tools = [_tool("slow_lookup", SCHEMAS["string"])]
    client = tool_server.client()
    base = dict(model=MODEL_NAME, tools=tools, max_tokens=48, seed=7, temperature=1.0)
    calls: dict[int, dict] = {}
    for chunk in client.chat.completions.create(**base, messages=USER, tool_choice="required", stream=True):
        for choice in chunk.choices:
            for d in choice.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = call["id"] or d.id
                call["name"] += d.function.name or ""
                call["arguments"] += d.function.arguments or ""
    first = calls[0]
    assert pauses.pending[first["id"]][0] == "slow_lookup"
    time.sleep(2.0)  # the client "runs" its tool
    messages = USER + [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": first["id"], "type": "function",
            "function": {"name": first["name"], "arguments": first["arguments"]}}]},
        {"role": "tool", "tool_call_id": first["id"], "content": "42"},
    ]
    reply = client.chat.completions.create(**base, messages=messages, tool_choice="required")
    assert first["id"] not in pauses.pending
    assert 2.0 <= pauses.latency["slow_lookup"] < 4.0
    assert reply.choices[0].message.tool_calls[0].id in pauses.pending  # issued, not streamed
    ttls = tool_server.front.call(
        lambda e: [p.expires_at - p.pinned_at for p in e.kv.pins.pins.values()]
    ).result(10)
    assert any(6.0 <= t < 12.0 for t in ttls), ttls  # 3 x the pause, not the 30 s default
