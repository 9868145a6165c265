"""/v1/responses through the real openai client: create, retrieve, continue (the chain's
KV stays pinned, so a follow-up prefills only its new tokens), streamed events,
function tools, structured text, store=false, delete, restarts, and refusals."""

from __future__ import annotations

import json
import time

import jsonschema
import openai
import pytest

from agentcpu.server import ServerSettings
from tests.server.conftest import MODEL_NAME, LiveServer
from tests.server.test_disconnect import _the_running_request

BLOCK_SIZE = 16  # LiveServer's
LONG = "Please tell me about the weather in Oslo and Bergen this week. " * 12
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "weather for a city",
        "parameters": WEATHER,
        "strict": True,
    }
]


def _live(model_dir, store_dir) -> LiveServer:
    settings = ServerSettings.for_model(MODEL_NAME, response_store_dir=str(store_dir))
    return LiveServer(model_dir, settings, max_model_len=1536, kv_cache_gb=0.08)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("responses")


@pytest.fixture(scope="module")
def live(model_dir, store_dir):
    server = _live(model_dir, store_dir)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(live) -> openai.OpenAI:
    return live.client()


def _ask(client, **kwargs):
    return client.responses.create(model=MODEL_NAME, **{"temperature": 0, **kwargs})


def _pins(live) -> list[str]:
    return live.engine(lambda e: list(e.kv.pins.pins))


def _wait_idle(live, timeout: float = 30) -> bool:
    """No request left, no KV block held but pinned ones. (`LiveServer.wait_idle` counts a
    block twice when two chains' pins share it, as turns with the same prefix do here.)"""

    def idle(e) -> bool:
        pinned = {b for pin in e.kv.pins.pins.values() for b in pin.blocks}
        return not e.has_unfinished() and e.kv.pool.num_used == len(pinned)

    deadline = time.monotonic() + timeout
    while not live.engine(idle):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _computed(live) -> int:
    return live.engine(lambda e: e.stats.computed_tokens)


def test_create_retrieve_and_continue_prefilling_only_new_tokens(live, client):
    first = _ask(client, input=LONG, max_output_tokens=6)
    assert first.id.startswith("resp_") and first.object == "response" and first.model == MODEL_NAME
    assert first.status in ("completed", "incomplete") and first.store is True
    (message,) = first.output
    assert (
        message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    )
    assert message.content[0].type == "output_text" and first.output_text == message.content[0].text
    usage = first.usage
    assert (
        1 <= usage.output_tokens <= 6
        and usage.total_tokens == usage.input_tokens + usage.output_tokens
    )
    assert usage.output_tokens_details.reasoning_tokens == 0
    assert client.responses.retrieve(first.id).to_dict() == first.to_dict()
    assert f"r:{first.id}" in _pins(live)

    before = _computed(live)
    second = _ask(
        client, input="And next week?", previous_response_id=first.id, max_output_tokens=4
    )
    prefilled = _computed(live) - before
    cached = second.usage.input_tokens_details.cached_tokens
    assert second.previous_response_id == first.id
    assert cached >= first.usage.input_tokens - BLOCK_SIZE  # the whole first turn, in blocks
    new_tokens = second.usage.input_tokens - cached
    assert new_tokens < second.usage.input_tokens // 4
    assert prefilled <= new_tokens + second.usage.output_tokens  # nothing recomputed
    assert f"r:{first.id}" in _pins(live) and f"r:{second.id}" not in _pins(live)

    third = _ask(client, input="Thanks.", previous_response_id=second.id, max_output_tokens=2)
    assert third.usage.input_tokens_details.cached_tokens >= second.usage.input_tokens - BLOCK_SIZE


def test_conversation_is_the_stored_chain_and_instructions_are_not_inherited(client, tokenizer):
    def prompt_len(messages) -> int:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return len(tokenizer.encode(text, add_special_tokens=False))

    system = {"role": "system", "content": "Answer in one word."}
    first = _ask(client, input="Hello there", instructions=system["content"], max_output_tokens=3)
    assert first.instructions == system["content"]
    assert first.usage.input_tokens == prompt_len(
        [system, {"role": "user", "content": "Hello there"}]
    )
    history = [
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "Again"},
    ]
    plain = _ask(client, input="Again", previous_response_id=first.id, max_output_tokens=2)
    assert plain.instructions is None and plain.usage.input_tokens == prompt_len(history)
    again = _ask(
        client,
        input="Again",
        instructions=system["content"],
        previous_response_id=first.id,
        max_output_tokens=2,
    )
    assert again.usage.input_tokens == prompt_len([system, *history])


def test_stream_events_parse_and_reassemble_to_the_whole_answer(client):
    kwargs = dict(input=LONG, max_output_tokens=12, extra_body={"ignore_eos": True})
    whole = _ask(client, **kwargs)
    events = list(_ask(client, **kwargs, stream=True))
    types = [e.type for e in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = next(e for e in events if e.type == "response.output_text.done")
    final = events[-1].response
    assert deltas == done.text == final.output_text == whole.output_text
    assert whole.status == final.status == "incomplete"
    assert whole.incomplete_details.reason == final.incomplete_details.reason == "max_output_tokens"
    assert final.usage.output_tokens == whole.usage.output_tokens == 12
    assert client.responses.retrieve(final.id).output_text == whole.output_text


def _call_of(response):
    calls = [item for item in response.output if item.type == "function_call"]
    assert calls, response.output
    return calls[0]


def test_function_tools_required_call_then_its_output_continues(live, client):
    kwargs = dict(
        input="What is the weather?", tools=TOOLS, tool_choice="required", max_output_tokens=128
    )
    first = _ask(client, **kwargs, temperature=1.0, extra_body={"seed": 3})
    assert first.status == "completed" and first.tool_choice == "required"
    call = _call_of(first)
    assert (
        call.name == "get_weather"
        and call.call_id.startswith("call_")
        and call.id.startswith("fc_")
    )
    assert call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), WEATHER)

    events = list(_ask(client, **kwargs, temperature=1.0, extra_body={"seed": 3}, stream=True))
    streamed = "".join(
        e.delta for e in events if e.type == "response.function_call_arguments.delta"
    )
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert streamed == done.arguments == call.arguments
    assert (
        events[-1].type == "response.completed" and _call_of(events[-1].response).name == call.name
    )

    follow_up = _ask(
        client,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}],
        tools=TOOLS,
        max_output_tokens=4,
    )
    assert follow_up.status in ("completed", "incomplete") and follow_up.output
    assert (
        follow_up.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens - BLOCK_SIZE
    )

    # stateless: the output items go back in as input, nothing stored
    items = [
        {"role": "user", "content": "What is the weather?"},
        *(i.to_dict() for i in first.output),
    ]
    items.append({"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"})
    stateless = _ask(client, input=items, tools=TOOLS, max_output_tokens=4, store=False)
    assert stateless.usage.input_tokens == follow_up.usage.input_tokens


def test_text_format_json_schema_gives_valid_json(client):
    r = _ask(
        client,
        input="Give me the forecast as JSON.",
        text={
            "format": {"type": "json_schema", "name": "forecast", "schema": WEATHER, "strict": True}
        },
        max_output_tokens=128,
        temperature=1.0,
        extra_body={"seed": 5},
    )
    assert r.status == "completed" and r.text.format.type == "json_schema"
    jsonschema.validate(json.loads(r.output_text), WEATHER)


def test_store_false_delete_and_unknown_ids(live, client):
    unstored = _ask(client, input="hi", max_output_tokens=2, store=False)
    assert unstored.store is False and f"r:{unstored.id}" not in _pins(live)
    for missing in (unstored.id, "resp_nope"):
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(missing)
        with pytest.raises(openai.NotFoundError) as e:
            _ask(client, input="hi", previous_response_id=missing, max_output_tokens=2)
        assert e.value.body["param"] == "previous_response_id"
        assert missing in e.value.body["message"]
    kept = _ask(client, input="hi", max_output_tokens=2, metadata={"run": "7"})
    assert client.responses.retrieve(kept.id).metadata == {"run": "7"}
    client.responses.delete(kept.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(kept.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(kept.id)


def test_stream_closed_midway_aborts_frees_kv_and_stores_nothing(live, client):
    stream = _ask(
        client, input="hi", max_output_tokens=400, extra_body={"ignore_eos": True}, stream=True
    )
    created = next(stream)
    request = _the_running_request(live)
    stream.close()
    assert _wait_idle(live)
    assert request.finished and request.finish_reason == "abort"
    assert live.state.admission.in_flight == 0
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.response.id)


def test_a_restarted_server_finds_and_continues_stored_responses(model_dir, tmp_path):
    first_server = _live(model_dir, tmp_path)
    try:
        first = _ask(first_server.client(), input=LONG, max_output_tokens=4)
    finally:
        first_server.stop()
    second_server = _live(model_dir, tmp_path)
    try:
        client = second_server.client()
        assert client.responses.retrieve(first.id).to_dict() == first.to_dict()
        follow_up = _ask(client, input="More?", previous_response_id=first.id, max_output_tokens=2)
        assert follow_up.previous_response_id == first.id
        assert follow_up.usage.input_tokens > first.usage.input_tokens
        assert f"r:{first.id}" in _pins(second_server)  # the chain's session, anew
    finally:
        second_server.stop()


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"input": [{"type": "banana"}]}, "input.0", "function_call_output"),
        ({"input": [{"role": "robot", "content": "x"}]}, "input.0.role", "user"),
        (
            {"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
            "input.0.call_id",
            "required",
        ),
        (
            {"input": [{"type": "function_call_output", "call_id": "c1", "output": "x"}]},
            "input",
            "c1",
        ),
        ({"input": []}, "input", "empty"),
        (
            {"input": "hi", "max_output_tokens": 0},
            "max_output_tokens",
            "greater than or equal to 1",
        ),
        ({"input": "hi", "temperature": 3}, "temperature", "less than or equal to 2"),
        ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools.0.type", "function"),
        ({"input": "hi", "tool_choice": "required"}, "tool_choice", "tool"),
        ({"input": "hi", "text": {"format": {"type": "yaml"}}}, "text.format", "json_schema"),
        ({"input": "hi", "background": True}, "background", "not supported"),
        ({"input": "hi", "metadata": {"k": "v" * 600}}, "metadata.k", "512"),
    ],
)
def test_malformed_requests_are_400_naming_the_field(live, body, param, words):
    with live.http() as http:
        response = http.post("/v1/responses", json={"model": MODEL_NAME, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert error["type"] == "invalid_request_error"
