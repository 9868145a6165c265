"""How long clients take to run their tools, learned per tool name.

A plain OpenAI client running its own agent loop gets a completion that ends in tool
calls, runs them, and sends the next request with `role: "tool"` messages naming the
call ids. The gap between the two is the tool's latency as the server sees it (tool run
+ client overhead). `ToolPauses` remembers the ids of calls it issued (bounded, oldest
dropped), matches them when the results come back, and keeps an exponential moving
average per tool name. The chat endpoint pins a tool-using turn's KV for
`pin_ttl(offered tool names)`: a few times the slowest recent latency among the tools
the request offers (`agents/pin_ttl.py`), or the configured default before any is known.
So fast tools free their pins soon and slow tools keep their session warm.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable

from agentcpu.agents.pin_ttl import pin_ttl_from_latencies

MAX_PENDING_CALLS = 10_000
MAX_TOOL_NAMES = 1_000
EMA_WEIGHT = 0.2  # weight of the newest pause, as the server-side tool executor


class ToolPauses:
    def __init__(self, clock=time.monotonic, max_pending: int = MAX_PENDING_CALLS):
        self.clock = clock
        self.max_pending = max_pending
        self.pending: OrderedDict[str, tuple[str, float]] = OrderedDict()  # id -> (name, issued at)
        self.latency: OrderedDict[str, float] = OrderedDict()  # tool name -> EMA seconds
        self.observed = 0

    def calls_issued(self, calls: Iterable[dict]) -> None:
        """Remember the tool calls of a finished completion (OpenAI `tool_calls` items)."""
        now = self.clock()
        for call in calls:
            call_id, name = call.get("id"), (call.get("function") or {}).get("name")
            if call_id and name:
                self.pending[call_id] = (name, now)
                self.pending.move_to_end(call_id)
        while len(self.pending) > self.max_pending:
            self.pending.popitem(last=False)

    def results_seen(self, messages: Iterable[dict]) -> None:
        """Match the `role: "tool"` messages of a new request against issued calls."""
        now = self.clock()
        for message in messages:
            if message.get("role") != "tool":
                continue
            issued = self.pending.pop(message.get("tool_call_id") or "", None)
            if issued is None:
                continue  # not ours, or already counted (a client resends its history)
            name, at = issued
            old = self.latency.get(name)
            pause = now - at
            self.latency[name] = pause if old is None else old + EMA_WEIGHT * (pause - old)
            self.latency.move_to_end(name)
            self.observed += 1
            while len(self.latency) > MAX_TOOL_NAMES:
                self.latency.popitem(last=False)

    def pin_ttl(self, tool_names: Iterable[str]) -> float | None:
        """Pin TTL for a turn offering these tools; None: no latency known for any."""
        return pin_ttl_from_latencies(self.latency.get(name) for name in tool_names)
