"""ToolPauses: client tools' latency learned from issued calls and returned results."""

from __future__ import annotations

from agentcpu.agents.pin_ttl import MAX_PIN_TTL_S, MIN_PIN_TTL_S, pin_ttl_from_latencies
from agentcpu.server.tool_pauses import ToolPauses


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _call(call_id: str, name: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": "{}"}}


def test_pause_is_learned_per_tool_and_counted_once():
    clock = Clock()
    pauses = ToolPauses(clock=clock)
    assert pauses.pin_ttl(["search"]) is None  # nothing known: the engine default
    pauses.calls_issued([_call("a", "search"), _call("b", "fetch")])
    clock.now += 4.0
    history = [{"role": "user"}, {"role": "tool", "tool_call_id": "a"}, {"role": "tool", "tool_call_id": "b"}]
    pauses.results_seen(history)
    assert pauses.latency == {"search": 4.0, "fetch": 4.0}
    pauses.calls_issued([_call("c", "search")])
    clock.now += 14.0
    pauses.results_seen(history + [{"role": "tool", "tool_call_id": "c"}])  # a and b again: ignored
    assert abs(pauses.latency["search"] - (4.0 + 0.2 * (14.0 - 4.0))) < 1e-9
    assert pauses.latency["fetch"] == 4.0
    assert pauses.observed == 3
    assert pauses.pin_ttl(["fetch"]) == 12.0
    assert pauses.pin_ttl(["fetch", "search", "unknown"]) == 3 * pauses.latency["search"]


def test_unknown_ids_and_bad_items_are_ignored():
    pauses = ToolPauses(clock=Clock())
    pauses.calls_issued([{"id": "x"}, {"function": {"name": "f"}}, {}])
    assert not pauses.pending
    pauses.results_seen([{"role": "tool", "tool_call_id": "never-issued"}, {"role": "tool"}])
    assert pauses.observed == 0 and not pauses.latency


def test_pending_calls_are_bounded_oldest_dropped():
    pauses = ToolPauses(clock=Clock(), max_pending=3)
    pauses.calls_issued([_call(str(i), "t") for i in range(5)])
    assert list(pauses.pending) == ["2", "3", "4"]


def test_ttl_is_clamped():
    assert pin_ttl_from_latencies([0.01]) == MIN_PIN_TTL_S
    assert pin_ttl_from_latencies([1000.0, None]) == MAX_PIN_TTL_S
    assert pin_ttl_from_latencies([None, None]) is None
