"""Prometheus metrics, in a registry owned by one app (two apps in a process never clash).

Engine state (queue lengths, KV blocks, prefix-cache hit rate) is read at scrape time;
plain integer reads from the engine thread's objects are safe under the GIL. Latencies
and token counts are recorded by the HTTP layer as outputs arrive.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from agentcpu.engine.llm_engine import LLMEngine

PREFIX = "agentcpu"
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ServerMetrics:
    def __init__(self, engine: LLMEngine, model_name: str):
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name}
        self._engine_gauges(engine, labels)
        self.in_flight = self._gauge("requests_in_flight", "engine requests admitted by the server")
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "arrival to first token",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            f"{PREFIX}_inter_token_latency_seconds",
            "time between successive tokens",
            buckets=ITL_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens", "prompt tokens of finished requests", registry=self.registry
        )
        self.generation_tokens = Counter(
            f"{PREFIX}_generation_tokens", "tokens generated", registry=self.registry
        )
        self.finished = Counter(
            f"{PREFIX}_requests_finished",
            "engine requests finished, by reason",
            ["finish_reason"],
            registry=self.registry,
        )
        self._agent_counters()

    def _agent_counters(self) -> None:
        """Server-side agent runs (`server_tools`) and their tool calls, per tool name."""
        self.agent_runs = Counter(
            f"{PREFIX}_agent_runs",
            "server-side agent runs, by how they ended",
            ["finish_reason"],
            registry=self.registry,
        )
        self.tool_calls = Counter(
            f"{PREFIX}_tool_calls", "server-side tool calls", ["tool"], registry=self.registry
        )
        self.tool_errors = Counter(
            f"{PREFIX}_tool_errors",
            "server-side tool calls that failed (raised, timed out, bad arguments or output)",
            ["tool"],
            registry=self.registry,
        )

    def _gauge(self, name: str, doc: str) -> Gauge:
        return Gauge(f"{PREFIX}_{name}", doc, registry=self.registry)

    def _engine_gauges(self, engine: LLMEngine, labels: dict[str, str]) -> None:
        info = Gauge(
            f"{PREFIX}_model_info", "the served model", list(labels), registry=self.registry
        )
        info.labels(**labels).set(1)
        self._gauge("requests_running", "requests in the running batch").set_function(
            lambda: len(engine.scheduler.running)
        )
        self._gauge("requests_waiting", "requests waiting to be admitted").set_function(
            lambda: len(engine.scheduler.waiting)
        )
        self._gauge("kv_blocks_used", "KV cache blocks in use").set_function(
            lambda: engine.kv.pool.num_used
        )
        self._gauge("kv_blocks_total", "KV cache blocks in the pool").set_function(
            lambda: engine.kv.pool.num_blocks
        )
        self._gauge(
            "prefix_cache_hit_rate", "share of prompt tokens served from the prefix cache"
        ).set_function(lambda: _hit_rate(engine))
        pins = engine.kv.pins
        self._gauge("session_pinned_kv_blocks", "KV blocks pinned for sessions waiting on tools").set_function(
            lambda: pins.num_pinned_blocks
        )
        self._gauge("session_pins", "sessions whose KV is pinned").set_function(lambda: len(pins.pins))
        self._gauge("session_resumes", "turns that found their session's pinned KV").set_function(
            lambda: pins.stats.resumed
        )
        self._gauge("session_pins_released_pressure", "pins released under memory pressure").set_function(
            lambda: pins.stats.released_pressure
        )
        self._gauge("session_prefix_tokens_saved", "prompt tokens sessions found cached").set_function(
            lambda: sum(s.cached_tokens_saved for s in pins.sessions.values())
        )
        self._gauge("kv_spilled_blocks", "KV blocks written to the disk spill store").set_function(
            lambda: engine.kv.spill.spilled_blocks if engine.kv.spill else 0
        )
        self._gauge("kv_restored_blocks", "KV blocks restored from the disk spill store").set_function(
            lambda: engine.kv.spill.restored_blocks if engine.kv.spill else 0
        )

    def record_finished(self, finish_reason: str | None, num_prompt_tokens: int) -> None:
        self.finished.labels(finish_reason=finish_reason or "unknown").inc()
        self.prompt_tokens.inc(num_prompt_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _hit_rate(engine: LLMEngine) -> float:
    stats = engine.stats
    return stats.cached_prompt_tokens / stats.prompt_tokens if stats.prompt_tokens else 0.0
