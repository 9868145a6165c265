"""What chat and completions share: sampling params from a request, engine streams that
record latency metrics, merging the streams of several choices, disconnect handling, SSE.

Disconnects: a stream's body iterator is cancelled or closed by the server when the
client goes (the engine's `generate` aborts on exit, freeing KV at once); a non-streamed
request runs beside a watcher of the connection and is cancelled the same way.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import aclosing
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from agentcpu.engine.outputs import RequestOutput
from agentcpu.engine.sampling_params import SamplingParams
from agentcpu.errors import AgentCPUError
from agentcpu.server.errors import FieldError
from agentcpu.server.protocol import SamplingFields
from agentcpu.server.state import ServerState

SEED_MODULUS = 2**64
SSE_DONE = "data: [DONE]\n\n"
STATUS_CLIENT_CLOSED = 499  # never read by anyone: the client has left


class ClientDisconnected(Exception):
    pass


# ---- request -> engine ----------------------------------------------------------------


def refuse_unsupported(body: SamplingFields) -> None:
    if body.logit_bias:
        raise FieldError("logit_bias", "is not supported")


def sampling_params(
    body: SamplingFields, *, max_tokens: int, logprobs: int | None, choice: int
) -> SamplingParams:
    """Choice `choice` of `n`: a given seed is offset per choice so choices differ."""
    seed = None if body.seed is None else (body.seed + choice) % SEED_MODULUS
    stop = body.stop if body.stop is not None else []
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=_or(body.temperature, 1.0),
        top_p=_or(body.top_p, 1.0),
        top_k=_or(body.top_k, 0),
        min_p=_or(body.min_p, 0.0),
        seed=seed,
        repetition_penalty=_or(body.repetition_penalty, 1.0),
        presence_penalty=_or(body.presence_penalty, 0.0),
        frequency_penalty=_or(body.frequency_penalty, 0.0),
        stop=[stop] if isinstance(stop, str) else list(stop),
        stop_token_ids=list(body.stop_token_ids or []),
        ignore_eos=body.ignore_eos,
        min_tokens=body.min_tokens,
        logprobs=logprobs,
    )


def _or(value, default):
    return default if value is None else value


async def engine_stream(
    state: ServerState,
    prompt: list[int],
    params: SamplingParams,
    request_id: str,
    arrival: float,
    constraint=None,
    session_id: str | None = None,
    pin_ttl_s: float | None = None,
) -> AsyncIterator[RequestOutput]:
    """The engine's outputs for one request, recording TTFT, inter-token latency, tokens.
    With a `session_id` the engine pins the request's KV for the session's next turn
    (for `pin_ttl_s`; None: the engine's default)."""
    metrics = state.metrics
    last, out, reason = None, None, "abort"
    stream = state.front.generate(
        prompt, params, request_id, constraint, session_id=session_id, pin_ttl_s=pin_ttl_s
    )
    try:
        async with aclosing(stream) as outs:
            async for out in outs:
                now = time.perf_counter()
                if last is None:
                    metrics.ttft.observe(now - arrival)
                else:
                    metrics.itl.observe(now - last)
                last = now
                metrics.generation_tokens.inc(len(out.delta_token_ids))
                if out.finished:
                    reason = out.finish_reason
                yield out
    except Exception:
        reason = "error"
        raise
    finally:
        metrics.record_finished(reason, len(prompt))


async def merge_streams(
    streams: list[AsyncIterator[RequestOutput]],
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(choice index, output) from several streams as they come; closing aborts them all."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:
            async for out in only:
                yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async with aclosing(stream):
                async for out in stream:
                    queue.put_nowait((index, out))
        except Exception as e:
            queue.put_nowait((index, e))
            return
        queue.put_nowait((index, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        for _ in range(len(streams)):
            while (item := await queue.get())[1] is not None:
                if isinstance(item[1], Exception):
                    raise item[1]
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def final_outputs(
    merged: AsyncIterator[tuple[int, RequestOutput]], n: int
) -> list[RequestOutput]:
    finals: list[RequestOutput | None] = [None] * n
    async with aclosing(merged):
        async for index, out in merged:
            finals[index] = out
    return finals  # type: ignore[return-value]


# ---- disconnects ----------------------------------------------------------------------


async def _disconnected(request: Request) -> None:
    # The body is read already, so the next ASGI message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Coroutine[Any, Any, Any]) -> Any:
    """Run `work`; if the client disconnects first, cancel it and raise ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait((task,))
    if task.cancelled():
        raise ClientDisconnected
    return task.result()


def client_closed_response() -> Response:
    return Response(status_code=STATUS_CLIENT_CLOSED)


# ---- server-sent events ---------------------------------------------------------------


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def sse_error(error: Exception) -> str:
    kind = "invalid_request_error" if isinstance(error, AgentCPUError) else "server_error"
    return sse({"error": {"message": str(error), "type": kind, "param": None, "code": None}})


class SSEResponse(StreamingResponse):
    """An event stream that, however it ends (finished, client gone, server stopping),
    closes its body iterator (aborting engine requests) and then calls `on_close`."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
            finally:
                self._on_close()
