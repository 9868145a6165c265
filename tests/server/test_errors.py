"""Every refusal has its status, OpenAI's error shape, and a message that helps."""

from __future__ import annotations

import threading
import time

import openai
import pytest

from agentcpu.server import ServerSettings
from tests.server.conftest import API_KEY, MODEL_NAME, LiveServer

USER = [{"role": "user", "content": "hi"}]


def _post(server, path: str, body=None, content: str | None = None, **headers):
    with server.http() as http:
        if content is not None:
            headers.setdefault("content-type", "application/json")
            return http.post(path, content=content, headers=headers)
        return http.post(path, json=body, headers=headers)


def _error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"messages": "hi"}, "messages", "valid list"),
        ({}, "messages", "required"),
        ({"messages": []}, "messages", "at least 1"),
        ({"messages": [{"role": "user"}]}, "messages.0.content", "required"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0", "role"),
        ({"messages": USER, "temperature": "hot"}, "temperature", "number"),
        ({"messages": USER, "temperature": 3}, "temperature", "less than or equal to 2"),
        ({"messages": USER, "n": 0}, "n", "greater than or equal to 1"),
        ({"messages": USER, "max_tokens": "many"}, "max_tokens", "integer"),
        ({"messages": USER, "stop": 5}, "stop", "string"),
        ({"messages": USER, "stream": "yes please"}, "stream", "boolean"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
                ]
            },
            "messages.0.content.0.type",
            "'text'",
        ),
        ({"messages": USER, "tool_choice": "sometimes"}, "tool_choice", "none"),
        ({"messages": USER, "response_format": {"type": "yaml"}}, "response_format", "json_schema"),
    ],
)
def test_wrong_fields_are_400_naming_the_field(server, body, param, words):
    error = _error(_post(server, "/v1/chat/completions", body), 400)
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert param.split(".")[0] in error["message"] and words in error["message"]


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"prompt": []}, "prompt", "at least 1"),
        ({"prompt": [1, -2]}, "prompt.1", "greater than or equal to 0"),
        ({"prompt": [[1], "x"]}, "prompt.1", "valid"),
        ({"prompt": "x", "logprobs": 50}, "logprobs", "less than or equal to 20"),
        ({"prompt": "x", "suffix": "y"}, "suffix", "not supported"),
        ({"prompt": "x", "logit_bias": {"5": 1.0}}, "logit_bias", "not supported"),
    ],
)
def test_completion_fields_are_400(server, body, param, words):
    error = _error(_post(server, "/v1/completions", body), 400)
    assert error["param"] == param and words in error["message"]


def test_malformed_json_and_missing_body_are_400(server):
    error = _error(_post(server, "/v1/chat/completions", content='{"messages": [1,'), 400)
    assert "not valid JSON" in error["message"] and error["code"] == "json_invalid"
    error = _error(_post(server, "/v1/chat/completions", content=""), 400)
    assert "body" in error["message"]


def test_semantic_refusals(server):
    cases = [
        ({"messages": USER, "top_logprobs": 2}, "top_logprobs", "logprobs: true"),
        ({"messages": USER, "tool_choice": "required"}, "tool_choice", "tools"),
        ({"messages": USER, "max_tokens": 4, "min_tokens": 9}, None, "min_tokens"),
        (
            {
                "messages": USER,
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            "tool_choice",
            "'g'",
        ),
    ]
    for body, param, words in cases:
        error = _error(_post(server, "/v1/chat/completions", body), 400)
        assert error["param"] == param and words in error["message"], error


def test_context_length_is_400_with_both_counts(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt=list(range(1, 600)), max_tokens=5)
    error = e.value.body
    assert error["code"] == "context_length_exceeded"
    assert "599" in error["message"] and "512" in error["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=10_000)
    assert "10000" in e.value.body["message"] and "512" in e.value.body["message"]


def test_token_outside_vocabulary_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt=[1, 10**9], max_tokens=2)
    assert "outside the vocabulary" in e.value.body["message"]


def test_unknown_model_is_404(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=USER)
    assert e.value.body["code"] == "model_not_found" and "gpt-9" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")


def test_unknown_route_and_method_use_the_error_shape(server):
    with server.http() as http:
        _error(http.get("/v1/nothing"), 404)
        _error(http.get("/v1/chat/completions"), 405)


# ---- auth ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_server(model_dir):
    live = LiveServer(model_dir, ServerSettings.for_model(MODEL_NAME, api_key=API_KEY))
    yield live
    live.stop()


def test_api_key(keyed_server):
    with pytest.raises(openai.AuthenticationError) as e:
        keyed_server.client(api_key="wrong").models.list()
    assert e.value.body["message"] == "invalid API key"
    error = _error(_post(keyed_server, "/v1/chat/completions", content="{broken"), 401)
    assert "missing API key" in error["message"]
    assert keyed_server.client().models.list().data[0].id == MODEL_NAME
    with keyed_server.http() as http:
        assert http.get("/health").status_code == 200
        assert http.get("/metrics").status_code == 200
        schema = http.get("/openapi.json").json()
    assert schema["paths"]["/v1/chat/completions"]["post"]["security"] == [{"bearerAuth": []}]


# ---- queue limit -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def queue_server(model_dir):
    live = LiveServer(model_dir, ServerSettings.for_model(MODEL_NAME, max_queue=2, retry_after_s=3))
    yield live
    live.stop()


def test_full_queue_is_429_with_retry_after(queue_server):
    gate = threading.Event()
    blocked = queue_server.front.call(lambda e: gate.wait(30))  # park the engine thread
    client = queue_server.client()
    try:
        held = client.chat.completions.create(
            model=MODEL_NAME, messages=USER, max_tokens=4, stream=True, n=2
        )
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=4)
        assert e.value.response.headers["retry-after"] == "3"
        assert e.value.body["code"] == "queue_full" and "2 of 2" in e.value.body["message"]
    finally:
        gate.set()
        blocked.result(30)
    assert len([c for c in held if c.choices and c.choices[0].finish_reason]) == 2
    # the slot is released in the handler's `finally`, just after the last bytes go out
    deadline = time.monotonic() + 5
    while queue_server.state.admission.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert queue_server.state.admission.in_flight == 0
    r = client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")
