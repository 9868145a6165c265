"""/metrics: engine gauges, latency histograms and token counters in Prometheus format."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import MODEL_NAME

PROMPT = list(range(1, 41))  # over two KV blocks, so the repeat hits the prefix cache


def _families(server) -> dict:
    with server.http() as http:
        response = http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(response.text)}


def _value(family, suffix: str = "") -> float:
    return sum(s.value for s in family.samples if s.name == family.name + suffix)


def test_metrics_have_every_series(server, client):
    client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=5, extra_body={"ignore_eos": True}
    )
    list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=5, stream=True))
    families = _families(server)
    for name in (
        "requests_running",
        "requests_waiting",
        "kv_blocks_used",
        "kv_blocks_total",
        "prefix_cache_hit_rate",
        "requests_in_flight",
    ):
        assert f"agentcpu_{name}" in families, name
    blocks = server.engine(lambda e: e.kv.pool.num_blocks)
    assert _value(families["agentcpu_kv_blocks_total"]) == blocks
    assert _value(families["agentcpu_requests_running"]) == 0
    assert _value(families["agentcpu_time_to_first_token_seconds"], "_count") >= 2
    assert _value(families["agentcpu_inter_token_latency_seconds"], "_count") >= 8
    assert _value(families["agentcpu_generation_tokens"], "_total") >= 10
    assert _value(families["agentcpu_prompt_tokens"], "_total") >= 80
    assert 0 < _value(families["agentcpu_prefix_cache_hit_rate"]) <= 1  # the second prompt hit


def test_health(server):
    with server.http() as http:
        assert http.get("/health").json() == {"status": "ok"}
