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


def test_get_and_delete_session(server):
    url = f"{server.url}/v1/chat/completions"
    body = {"model": "default", "messages": [{"role": "user", "content": "tell " * 60}], "max_tokens": 3}
    for _ in range(2):
        assert httpx.post(url, json=body, headers={"X-Session-Id": "inspect-me"}, timeout=60).status_code == 200
    info = httpx.get(f"{server.url}/v1/sessions/inspect-me", timeout=30).json()
    assert info["id"] == "inspect-me" and info["turns"] == 2
    assert info["tokens_cached"] >= 48 and info["kv_bytes_pinned"] > 0
    assert info["prefix_tokens_saved"] >= 48
    metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    assert "agentcpu_session_pinned_kv_blocks" in metrics
    gone = httpx.delete(f"{server.url}/v1/sessions/inspect-me", timeout=30)
    assert gone.status_code == 200 and gone.json()["deleted"] is True
    assert "s:inspect-me" not in _pins(server)
    missing = httpx.get(f"{server.url}/v1/sessions/inspect-me", timeout=30)
    assert missing.status_code == 404 and "inspect-me" in missing.json()["error"]["message"]
    assert httpx.delete(f"{server.url}/v1/sessions/nobody", timeout=30).status_code == 404


def test_completions_session_pins_and_next_turn_reuses_every_computed_token(server):
    """A raw-prompt agent loop (token ids, as `agentcpu bench` sends) naming a session: the
    turn's KV is pinned, and the next turn computes only what it adds, the partly filled
    last block included (cached tokens are not a multiple of the block size)."""
    url = f"{server.url}/v1/completions"
    prompt = [(7 * i) % 200 + 10 for i in range(90)]
    body = {"model": "default", "prompt": prompt, "max_tokens": 5, "temperature": 0, "user": "raw-1"}
    assert httpx.post(url, json=body, timeout=60).status_code == 200
    # what the pin holds: the prompt and the reply but its last token (never fed back)
    held = server.engine(lambda e: list(e.kv.pins.pins["s:raw-1"].tokens))
    assert held[: len(prompt)] == prompt and len(held) == len(prompt) + 4
    assert len(held) % 16, "the turn must end inside a block"
    body["prompt"] = held + [11, 12, 13]
    second = httpx.post(url, json=body, timeout=60).json()
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == len(held)
    # without a session name nothing is pinned for the next turn
    body |= {"user": None, "prompt": [5] * 50}
    assert httpx.post(url, json=body, timeout=60).status_code == 200
    assert not any(s.startswith("anon:") for s in _pins(server))
