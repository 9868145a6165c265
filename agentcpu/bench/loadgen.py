"""Async load generator for any OpenAI-compatible server (`/v1/completions`, streamed).

Every request sends token ids, asks for the usage in the final chunk
(`stream_options.include_usage`) and, where the server supports it, forces its output
length with `ignore_eos` + `min_tokens` = `max_tokens`; the returned usage is checked
against the asked length and mismatches are counted, not hidden. Time to first token
and inter-token gaps are taken from SSE chunk arrival on the client.

A run is bounded twice: by a request count and by wall time; at the deadline requests
still in flight are cancelled and recorded as `deadline` errors. The client talks only
to the one base URL it is given (default: loopback), never follows redirects and
ignores proxy settings from the environment.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from agentcpu.bench.metrics import RequestResult
from agentcpu.bench.workloads import Job, Level, RequestJob, SessionJob, WorkloadSpec, build_jobs
from agentcpu.errors import AgentCPUError

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
REQUEST_TIMEOUT_S = 1800.0  # a 64-stream level on 2 cores can take minutes per request
CONNECT_TIMEOUT_S = 10.0
ERROR_DETAIL_CHARS = 500

ResultSink = Callable[[RequestResult], None]


class LoadgenError(AgentCPUError, ValueError):
    """A bad base URL, or a server that answers nothing usable."""


@dataclass(frozen=True)
class ServerCaps:
    """What the server under test honours: forced lengths (`ignore_eos`/`min_tokens`),
    usage in the last streamed chunk, token ids in streamed choices (`return_token_ids`)."""

    fixed_length: bool = True
    usage_in_stream: bool = True
    returns_token_ids: bool = False


@dataclass(frozen=True)
class Limits:
    max_requests: int | None = None
    max_duration_s: float | None = None

    def __post_init__(self) -> None:
        if self.max_requests is not None and self.max_requests < 1:
            raise LoadgenError(f"max_requests must be >= 1, got {self.max_requests}")
        if self.max_duration_s is not None and self.max_duration_s <= 0:
            raise LoadgenError(f"max_duration_s must be > 0, got {self.max_duration_s}")


@dataclass
class RunOutcome:
    """One level of one workload against one server."""

    level: Level
    model: str
    results: list[RequestResult] = field(default_factory=list)
    wall_s: float = 0.0
    truncated: bool = False  # the request budget or the deadline cut the run short


# ---- base URL ------------------------------------------------------------------------


def check_base_url(url: str) -> str:
    """Validate an http(s) base URL and strip a trailing `/` or `/v1`."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LoadgenError(f"base URL must be http(s)://HOST[:PORT], got {url!r}")
    if parts.query or parts.fragment:
        raise LoadgenError(f"base URL must not carry a query or fragment, got {url!r}")
    path = parts.path.rstrip("/")
    path = path.removesuffix("/v1")
    return f"{parts.scheme}://{parts.netloc}{path}"


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@asynccontextmanager
async def open_http(
    base_url: str, api_key: str | None = None, timeout_s: float = REQUEST_TIMEOUT_S
):
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(
        base_url=check_base_url(base_url), headers=headers, trust_env=False, follow_redirects=False,
        timeout=httpx.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
    ) as http:  # fmt: skip
        yield http


async def discover_model(http: httpx.AsyncClient) -> str:
    """The first model id `/v1/models` lists."""
    try:
        response = await http.get("/v1/models")
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise LoadgenError(
            f"cannot read a model id from {http.base_url}/v1/models: {exc}"
        ) from None


# ---- one request ---------------------------------------------------------------------


class CompletionClient:
    """Streams `/v1/completions` requests and hands each finished `RequestResult` to `sink`
    exactly once, also when the request is cancelled."""

    def __init__(self, http: httpx.AsyncClient, model: str, caps: ServerCaps, sink: ResultSink):
        self.http, self.model, self.caps, self.sink = http, model, caps, sink
        self.t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def body(self, prompt: list[int], max_tokens: int, want_ids: bool, session: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0.0, "stream": True,
        }  # fmt: skip
        if session is not None:  # OpenAI's `user` field: an engine may key a session on it
            body["user"] = f"bench-session-{session}"
        if self.caps.usage_in_stream:
            body["stream_options"] = {"include_usage": True}
        if self.caps.fixed_length:
            body |= {"ignore_eos": True, "min_tokens": max_tokens}
        if want_ids and self.caps.returns_token_ids:
            body["return_token_ids"] = True
        return body

    async def complete(
        self, prompt: list[int], max_tokens: int, *, session: int | None = None,
        turn: int | None = None, want_ids: bool = False,
    ) -> RequestResult:  # fmt: skip
        result = RequestResult(len(prompt), max_tokens, self.now(), session=session, turn=turn)
        try:
            await self._send(result, self.body(prompt, max_tokens, want_ids, session))
        except httpx.TimeoutException as exc:
            _fail(result, "timeout", repr(exc))
        except httpx.TransportError as exc:
            _fail(result, "transport", repr(exc))
        except asyncio.CancelledError:
            _fail(result, "deadline", "cancelled at the run's deadline")
            raise
        finally:
            result.end_s = self.now()
            self.sink(result)
        return result

    async def _send(self, result: RequestResult, body: dict[str, Any]) -> None:
        async with self.http.stream("POST", "/v1/completions", json=body) as response:
            result.status = response.status_code
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                _fail(result, "http", text[:ERROR_DETAIL_CHARS])
                return
            await self._read_stream(response, result)

    async def _read_stream(self, response: httpx.Response, result: RequestResult) -> None:
        first_choice_s = None
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[len("data:") :].strip()
            if payload == "[DONE]":
                break
            try:
                event = json.loads(payload)
            except json.JSONDecodeError:
                _fail(result, "protocol", f"not JSON: {payload[:ERROR_DETAIL_CHARS]}")
                return
            if event.get("error") and not event.get("choices"):
                _fail(result, "stream", json.dumps(event["error"])[:ERROR_DETAIL_CHARS])
                return
            first_choice_s = _apply_event(event, result, self.now()) or first_choice_s
        if result.first_token_s is None:
            result.first_token_s = first_choice_s


def _apply_event(event: dict[str, Any], result: RequestResult, now: float) -> float | None:
    """Record one SSE event; returns `now` if it carried a choice (content or not)."""
    if event.get("usage"):
        _apply_usage(event["usage"], result)
    if result.cached_tokens is None and isinstance(event.get("timings"), dict):
        cache_n = event["timings"].get("cache_n")  # llama-server
        result.cached_tokens = int(cache_n) if cache_n is not None else None
    choices = event.get("choices") or []
    if not choices:
        return None
    choice = choices[0]
    ids = choice.get("token_ids")
    if choice.get("text") or ids:
        result.first_token_s = result.first_token_s if result.first_token_s is not None else now
        result.chunk_times.append(now)
    if ids:
        result.output_ids = (result.output_ids or []) + list(ids)
    return now


def _apply_usage(usage: dict[str, Any], result: RequestResult) -> None:
    if usage.get("completion_tokens") is not None:
        result.completion_tokens = int(usage["completion_tokens"])
    if usage.get("prompt_tokens") is not None:
        result.usage_prompt_tokens = int(usage["prompt_tokens"])
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict) and details.get("cached_tokens") is not None:
        result.cached_tokens = int(details["cached_tokens"])


def _fail(result: RequestResult, kind: str, detail: str) -> None:
    result.error, result.detail = kind, detail


# ---- jobs and dispatch ---------------------------------------------------------------


class RequestBudget:
    """At most `limit` requests over a run (None: unlimited)."""

    def __init__(self, limit: int | None):
        self.limit, self.taken, self.refused = limit, 0, False

    def take(self) -> bool:
        if self.limit is not None and self.taken >= self.limit:
            self.refused = True
            return False
        self.taken += 1
        return True


async def run_job(
    client: CompletionClient, job: Job, budget: RequestBudget, returned_history: bool
) -> None:
    if isinstance(job, RequestJob):
        if budget.take():
            await client.complete(job.prompt, job.max_tokens)
        return
    await run_session(client, job, budget, returned_history)


async def run_session(
    client: CompletionClient, job: SessionJob, budget: RequestBudget, returned_history: bool
) -> None:
    """The client-side tool loop: request, tool pause, append call + result, repeat.

    The appended call tokens are the session's pre-drawn ids (every engine gets the same
    history) unless `returned_history` and the server returned the generated ids.
    A failed turn ends its session.
    """
    history = list(job.first_prompt)
    for number, turn in enumerate(job.turns, start=1):
        if not budget.take():
            return
        result = await client.complete(
            history, turn.max_tokens, session=job.session, turn=number, want_ids=returned_history
        )
        if not result.ok or not turn.tool_result:
            return
        await asyncio.sleep(turn.pause_s)
        output = (
            result.output_ids if returned_history and result.output_ids else turn.synthetic_output
        )
        history = history + output + turn.tool_result


async def closed_loop(
    jobs: list[Job], concurrency: int, run: Callable[[Job], Awaitable[None]]
) -> None:
    """`concurrency` workers, each taking the next job when its last one finishes."""
    pending: Iterator[Job] = iter(jobs)

    async def worker() -> None:
        for job in pending:
            await run(job)

    async with asyncio.TaskGroup() as group:
        for _ in range(min(concurrency, len(jobs))):
            group.create_task(worker())


async def open_loop(
    jobs: list[Job], rate: float, cap: int | None, run: Callable[[Job], Awaitable[None]], seed: int
) -> None:
    """Poisson arrivals at `rate` jobs/s; at most `cap` jobs in flight (None: no cap)."""
    rng = random.Random(seed)
    slots = asyncio.Semaphore(cap) if cap else None

    async def start(job: Job) -> None:
        if slots is None:
            await run(job)
            return
        async with slots:
            await run(job)

    async with asyncio.TaskGroup() as group:
        for index, job in enumerate(jobs):
            group.create_task(start(job))
            if index + 1 < len(jobs):
                await asyncio.sleep(rng.expovariate(rate))


async def run_jobs(
    client: CompletionClient, jobs: list[Job], level: Level, limits: Limits,
    returned_history: bool = False, seed: int = 0,
) -> tuple[float, bool]:  # fmt: skip
    """Run one level's jobs; returns (wall seconds, truncated)."""
    budget = RequestBudget(limits.max_requests)

    async def run(job: Job) -> None:
        await run_job(client, job, budget, returned_history)

    if level.rate is None:
        dispatch = closed_loop(jobs, level.concurrency or 1, run)
    else:
        dispatch = open_loop(jobs, level.rate, level.concurrency, run, seed)
    start = time.perf_counter()
    timed_out = False
    try:
        await asyncio.wait_for(dispatch, limits.max_duration_s)
    except TimeoutError:
        timed_out = True
    return time.perf_counter() - start, timed_out or budget.refused


async def run_level(
    base_url: str, spec: WorkloadSpec, level: Level, seed: int, *, model: str | None = None,
    caps: ServerCaps | None = None, limits: Limits | None = None, api_key: str | None = None,
    on_result: ResultSink | None = None, timeout_s: float = REQUEST_TIMEOUT_S,
) -> RunOutcome:  # fmt: skip
    """Build the level's jobs from `seed` and run them against `base_url`."""
    jobs = build_jobs(spec, level, seed)
    async with open_http(base_url, api_key, timeout_s) as http:
        outcome = RunOutcome(level, model or await discover_model(http))

        def sink(result: RequestResult) -> None:
            outcome.results.append(result)
            if on_result is not None:
                on_result(result)

        client = CompletionClient(http, outcome.model, caps or ServerCaps(), sink)
        returned = spec.history == "returned"
        outcome.wall_s, outcome.truncated = await run_jobs(
            client, jobs, level, limits or Limits(), returned, seed
        )
    return outcome
