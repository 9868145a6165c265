"""Agent sessions over HTTP: a named session's KV is pinned between turns."""

from __future__ import annotations

import httpx


def _pins(server):
    return server.front.call(lambda e: dict(e.kv.pins.pins)).result(10)


def test_session_header_pins_and_next_turn_hits_cache(server):
    messages = [{"role": "user", "content": "word " * 80}]
    body = {"model": "default", "messages": messages, "max_tokens": 4}
    url = f"{server.url}/v1/chat/completions"
    first = httpx.post(url, json=body, headers={"X-Session-Id": "agent-7"}, timeout=60)
    assert first.status_code == 200
    assert "s:agent-7" in _pins(server)
    reply = first.json()["choices"][0]["message"]["content"]
    body["messages"] = messages + [{"role": "assistant", "content": reply}, {"role": "user", "content": "more"}]
    second = httpx.post(url, json=body, headers={"X-Session-Id": "agent-7"}, timeout=60)
    cached = second.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= 64


def test_user_field_names_the_session(server):
    body = {"model": "default", "messages": [{"role": "user", "content": "hello " * 40}], "max_tokens": 2, "user": "u1"}
    assert httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).status_code == 200
    assert "s:u1" in _pins(server)


def test_session_id_too_long_is_400(server):
    body = {"model": "default", "messages": [{"role": "user", "content": "hi"}], "session_id": "x" * 300}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and "session_id" in r.text
