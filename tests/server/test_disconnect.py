"""A client that leaves mid-answer: the engine aborts its request and frees its KV."""

from __future__ import annotations

import json
import socket
import time

from tests.server.conftest import MODEL_NAME

LONG = dict(max_tokens=400, extra_body={"ignore_eos": True}, temperature=0)
POLL_S = 0.005


def _the_running_request(server, min_tokens: int = 1, timeout: float = 30):
    """The engine's only request, once it has produced `min_tokens` tokens."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        requests = server.engine(lambda e: list(e.requests.values()))
        if requests and len(requests[0].output_token_ids) >= min_tokens:
            assert len(requests) == 1
            return requests[0]
        time.sleep(POLL_S)
    raise AssertionError("no request started generating")


def _aborted(server) -> float:
    text = server.state.metrics.render().decode()
    line = next(
        s
        for s in text.splitlines()
        if s.startswith('agentcpu_requests_finished_total{finish_reason="abort"}')
    )
    return float(line.split()[-1])


def test_stream_closed_midway_aborts_and_frees_blocks(server, client):
    assert server.wait_idle() == (0, False)
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], stream=True, **LONG
    )
    chunks = [next(stream) for _ in range(3)]
    request = _the_running_request(server)
    assert chunks[0].choices[0].delta.role == "assistant"
    stream.close()
    assert server.wait_idle() == (0, False)
    assert request.finished and request.finish_reason == "abort"
    assert len(request.output_token_ids) < 400
    assert server.state.admission.in_flight == 0
    assert _aborted(server) >= 1


def test_whole_answer_client_gone_aborts_and_frees_blocks(server):
    body = json.dumps(
        {"model": MODEL_NAME, "prompt": [5, 6, 7], "max_tokens": 480, "ignore_eos": True}
    ).encode()
    host, port = server.url.removeprefix("http://").split(":")
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    before = _aborted(server)
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(head + body)
        request = _the_running_request(server, min_tokens=2)
    assert server.wait_idle() == (0, False)
    assert request.finished and request.finish_reason == "abort"
    assert len(request.output_token_ids) < 480
    assert server.state.admission.in_flight == 0
    assert _aborted(server) == before + 1
