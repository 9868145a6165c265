"""What one served request recorded, and the figures computed from many (pure functions).

Times are seconds on the load generator's clock, relative to the start of its run.
TTFT is the arrival of the first streamed chunk that carries a choice; TPOT is
(end - first token) / (output tokens - 1) per request; inter-token latency (ITL) is the
gap between consecutive streamed chunks (a server that sends several tokens per chunk
shows fewer, longer gaps). Token counts come from the server's `usage` where it reports
one, else from the streamed chunks.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

PERCENTILES = (50, 95, 99)


@dataclass
class RequestResult:
    """One request as the client saw it; `error` is None on success, else its kind
    (`http`, `transport`, `timeout`, `deadline`, `protocol`, `stream`)."""

    prompt_tokens: int
    expected_tokens: int
    start_s: float
    end_s: float | None = None
    first_token_s: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    completion_tokens: int | None = None  # from usage
    usage_prompt_tokens: int | None = None
    cached_tokens: int | None = None  # None: the server did not report it
    status: int | None = None
    error: str | None = None
    detail: str = ""
    session: int | None = None
    turn: int | None = None
    output_ids: list[int] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def error_key(self) -> str | None:
        """The errors-by-status key: the HTTP status, else the error kind."""
        if self.ok:
            return None
        return str(self.status) if self.error == "http" and self.status else self.error

    @property
    def output_tokens(self) -> int:
        return (
            self.completion_tokens if self.completion_tokens is not None else len(self.chunk_times)
        )

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.start_s

    @property
    def e2e_s(self) -> float | None:
        return None if self.end_s is None else self.end_s - self.start_s

    @property
    def tpot_s(self) -> float | None:
        if self.first_token_s is None or self.end_s is None or self.output_tokens < 2:
            return None
        return (self.end_s - self.first_token_s) / (self.output_tokens - 1)

    def itl_s(self) -> list[float]:
        times = self.chunk_times
        return [later - earlier for earlier, later in zip(times, times[1:], strict=False)]

    @property
    def length_mismatch(self) -> bool:
        return self.ok and self.output_tokens != self.expected_tokens

    def to_record(self) -> dict[str, Any]:
        """A compact JSON-able row (no per-chunk times or ids)."""
        return {
            "session": self.session, "turn": self.turn, "status": self.status, "error": self.error,
            "detail": self.detail[:200], "start_s": self.start_s, "ttft_s": self.ttft_s,
            "e2e_s": self.e2e_s, "tpot_s": self.tpot_s, "prompt_tokens": self.prompt_tokens,
            "usage_prompt_tokens": self.usage_prompt_tokens, "expected_tokens": self.expected_tokens,
            "output_tokens": self.output_tokens, "cached_tokens": self.cached_tokens,
            "chunks": len(self.chunk_times),
        }  # fmt: skip


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default); None for no values."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution(values: Iterable[float | None]) -> dict[str, float | int | None]:
    """{"p50", "p95", "p99", "mean", "max", "n"} of the non-None values."""
    present = [v for v in values if v is not None]
    out: dict[str, float | int | None] = {f"p{q}": percentile(present, q) for q in PERCENTILES}
    out["mean"] = statistics.fmean(present) if present else None
    out["max"] = max(present) if present else None
    out["n"] = len(present)
    return out


def errors_by_status(results: Iterable[RequestResult]) -> dict[str, int]:
    return dict(sorted(Counter(r.error_key for r in results if not r.ok).items()))


def wall_time(results: Sequence[RequestResult]) -> float:
    """First request start to last request end."""
    ends = [r.end_s for r in results if r.end_s is not None]
    if not results or not ends:
        return 0.0
    return max(ends) - min(r.start_s for r in results)


def cached_share(results: Iterable[RequestResult]) -> float | None:
    """Cached / prompt tokens over the successful requests whose server reported it."""
    reported = [r for r in results if r.ok and r.cached_tokens is not None]
    prompt = sum(_prompt_tokens(r) for r in reported)
    return sum(r.cached_tokens or 0 for r in reported) / prompt if prompt else None


def _prompt_tokens(result: RequestResult) -> int:
    return _server_count(result.usage_prompt_tokens, result.prompt_tokens)


def _server_count(usage: int | None, sent: int) -> int:
    """The prompt length as the server counted it (usage), else as the client sent it."""
    return usage if usage is not None else sent


def per_turn_ttft(results: Iterable[RequestResult]) -> dict[int, dict[str, float | int | None]]:
    """TTFT distribution per session turn (1-based), for session workloads."""
    by_turn: dict[int, list[float]] = {}
    for r in results:
        if r.ok and r.turn is not None and r.ttft_s is not None:
            by_turn.setdefault(r.turn, []).append(r.ttft_s)
    return {turn: distribution(by_turn[turn]) for turn in sorted(by_turn)}


def follow_up_prefill_ratios(
    records: Iterable[dict[str, Any]], prefill_tok_s: float
) -> list[float]:
    """For each follow-up turn (turn >= 2), its TTFT over the time its computed prompt
    tokens (prompt - cached) take at `prefill_tok_s`, the engine's prefill rate measured
    alone (`compare.calibrate_prefill`). 1.0 means the turn cost only the prefill of its
    new tokens; queueing behind other sessions, recomputed history and per-request
    overhead push it up. Records are per-request dicts (`RequestResult` fields); turns
    whose server does not report cached tokens are skipped. The calibration prefills
    after a mid-session context, so early turns (shorter context) can come out a little
    under 1.0 and late ones a little over."""
    ratios = []
    for r in records:
        counted = r.get("error") is None and r.get("cached_tokens") is not None
        if not counted or (r.get("turn") or 0) < 2 or not r.get("ttft_s"):
            continue
        prompt = _server_count(r.get("usage_prompt_tokens"), r["prompt_tokens"])
        computed = prompt - r["cached_tokens"]
        if computed > 0 and prefill_tok_s > 0:
            ratios.append(r["ttft_s"] * prefill_tok_s / computed)
    return ratios


def summarize(results: Sequence[RequestResult], wall_s: float | None = None) -> dict[str, Any]:
    """Every headline figure of one run; `wall_s` defaults to first start .. last end."""
    wall = wall_time(results) if wall_s is None else wall_s
    done = [r for r in results if r.ok]
    prompt = sum(_prompt_tokens(r) for r in done)
    output = sum(r.output_tokens for r in done)
    share = cached_share(done)
    cached = sum(r.cached_tokens or 0 for r in done if r.cached_tokens is not None)
    summary: dict[str, Any] = {
        "requests": len(results), "ok": len(done), "errors": len(results) - len(done),
        "errors_by_status": errors_by_status(results), "wall_s": wall,
        "requests_per_s": _per_second(len(done), wall), "prompt_tokens": prompt, "output_tokens": output,
        "cached_tokens": cached if share is not None else None, "cached_share": share,
        "output_tok_s": _per_second(output, wall),
        "processed_tok_s": _per_second(prompt + output, wall),
        "computed_tok_s": _per_second(prompt - cached + output, wall) if share is not None else None,
        "ttft_s": distribution(r.ttft_s for r in done), "tpot_s": distribution(r.tpot_s for r in done),
        "itl_s": distribution(gap for r in done for gap in r.itl_s()),
        "e2e_s": distribution(r.e2e_s for r in done),
        "length_mismatches": sum(r.length_mismatch for r in done),
        "usage_missing": sum(r.completion_tokens is None for r in done),
    }  # fmt: skip
    turns = per_turn_ttft(done)
    if turns:
        summary["per_turn_ttft_s"] = turns
    return summary


def _per_second(count: int, wall_s: float) -> float | None:
    return count / wall_s if wall_s > 0 else None


def cdf(values: Iterable[float | None]) -> tuple[list[float], list[float]]:
    """Sorted values and their cumulative fractions, for an empirical CDF plot."""
    ordered = sorted(v for v in values if v is not None)
    n = len(ordered)
    return ordered, [(i + 1) / n for i in range(n)]


def median_or_none(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None
