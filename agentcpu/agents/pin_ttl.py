"""How long to keep a session's KV while its tools run: a few times their recent latency.

Shared by the server-side agent loop (latencies measured by the tool executor) and the
chat endpoint (latencies of client-run tools, `server/tool_pauses.py`).
"""

from __future__ import annotations

from collections.abc import Iterable

MIN_PIN_TTL_S = 5.0
MAX_PIN_TTL_S = 300.0
PIN_TTL_LATENCY_FACTOR = 3.0  # keep KV for a few times the tools' typical latency


def pin_ttl_from_latencies(latencies: Iterable[float | None]) -> float | None:
    """A few times the slowest known latency, clamped to [5 s, 300 s]; None when no
    latency is known yet (the caller then uses the configured default)."""
    known = [x for x in latencies if x is not None]
    if not known:
        return None
    return min(MAX_PIN_TTL_S, max(MIN_PIN_TTL_S, PIN_TTL_LATENCY_FACTOR * max(known)))
