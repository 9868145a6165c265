"""/openapi.json describes what the server accepts, and fuzzing it never gets a 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable

from agentcpu.server import ServerSettings
from tests.server.conftest import MODEL_NAME, LiveServer

EXAMPLES_PER_OPERATION = 15
REQUEST_TIMEOUT_S = 60


def test_schema_documents_bodies_and_errors(server):
    with server.http() as http:
        schema = http.get("/openapi.json").json()
    chat = schema["paths"]["/v1/chat/completions"]["post"]
    body_ref = chat["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert body_ref.endswith("/ChatCompletionRequest")
    assert {"200", "400", "401", "404", "429"} <= set(chat["responses"])
    assert "text/event-stream" in chat["responses"]["200"]["content"]
    assert "422" not in str(schema["paths"]) and "HTTPValidationError" not in str(schema)
    request = schema["components"]["schemas"]["ChatCompletionRequest"]
    assert request["required"] == ["messages"]
    assert request["properties"]["n"]["maximum"] == 16
    completion = schema["components"]["schemas"]["CompletionRequest"]["properties"]["prompt"]
    assert len(completion["anyOf"]) == 4  # text, texts, token ids, lists of token ids
    assert {"/v1/completions", "/v1/models", "/health", "/metrics"} <= set(schema["paths"])


@pytest.fixture(scope="module")
def fuzzed_server(model_dir):
    """Short context and a small queue keep each fuzzed generation cheap."""
    settings = ServerSettings.for_model(MODEL_NAME, max_queue=8)
    live = LiveServer(model_dir, settings, max_model_len=128)
    yield live
    live.stop()


def _operations(live: LiveServer):
    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=lambda m: m.value)
def test_fuzzing_finds_no_server_error(fuzzed_server, mode):
    failures = []
    for operation in _operations(fuzzed_server):

        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def call(case):
            response = case.call(base_url=fuzzed_server.url, timeout=REQUEST_TIMEOUT_S)
            if response.status_code >= 500:
                failures.append(
                    (case.method, case.path, case.body, response.status_code, response.text)
                )

        try:
            call()
        except Unsatisfiable:  # nothing to get wrong (GET /health has no inputs)
            assert mode is schemathesis.GenerationMode.NEGATIVE
    assert not failures, failures[:3]
    assert fuzzed_server.wait_idle() == (0, False)
    assert fuzzed_server.state.admission.in_flight == 0
