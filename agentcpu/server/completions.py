"""POST /v1/completions: one or many prompts (text or token ids), n choices each.

A request naming a session (X-Session-Id, `session_id` or `user`) with one prompt keeps
its KV pinned for the session's next turn, as chat turns do: clients that run an agent
loop on raw prompts (or token ids, like `agentcpu bench`) get the same reuse.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import APIRouter, Request

from agentcpu.engine.outputs import RequestOutput
from agentcpu.engine.sampling_params import SamplingParams
from agentcpu.server.errors import FieldError
from agentcpu.server.generation import (
    SSE_DONE,
    ClientDisconnected,
    SSEResponse,
    client_closed_response,
    engine_stream,
    final_outputs,
    merge_streams,
    refuse_unsupported,
    sampling_params,
    sse,
    sse_error,
    unless_disconnected,
)
from agentcpu.server.logprobs import completion_logprobs
from agentcpu.server.openapi import ENDPOINT_RESPONSES
from agentcpu.server.protocol import CompletionRequest, CompletionResponse
from agentcpu.server.sessions import named_session
from agentcpu.server.state import ServerState, get_state

router = APIRouter()


@dataclass
class CompletionPlan:
    id: str
    created: int
    model: str
    prompts: list[list[int]]
    echoes: list[str]  # per prompt: its text when echo is on, else ""
    params: list[SamplingParams]  # per choice; choice i answers prompt i // n
    n: int

    def prompt_of(self, choice: int) -> list[int]:
        return self.prompts[choice // self.n]


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses=ENDPOINT_RESPONSES,
    summary="Create a completion (set stream=true for server-sent events)",
)
async def create_completion(body: CompletionRequest, request: Request):
    arrival = time.perf_counter()
    state = get_state(request)
    state.check_model(body.model)
    plan = plan_completion(state, body)
    ticket = state.admission.admit(len(plan.params))
    session = named_session(request, body) if len(plan.prompts) == 1 else None
    streams = [
        engine_stream(
            state, plan.prompt_of(i), params, f"{plan.id}-{i}", arrival,
            session_id=session if i == 0 else None,
        )
        for i, params in enumerate(plan.params)
    ]
    merged = merge_streams(streams)
    if body.stream:
        return SSEResponse(stream_completion(state, body, plan, merged), on_close=ticket.release)
    try:
        finals = await unless_disconnected(request, final_outputs(merged, len(streams)))
    except ClientDisconnected:
        return client_closed_response()
    finally:
        ticket.release()
    return completion_response(state, plan, finals)


def plan_completion(state: ServerState, body: CompletionRequest) -> CompletionPlan:
    refuse_unsupported(body)
    if body.suffix:
        raise FieldError("suffix", "is not supported")
    if body.best_of is not None and body.best_of != body.n:
        raise FieldError("best_of", "is not supported beyond best_of == n")
    prompts = [_token_ids(state, p) for p in _prompt_list(body.prompt)]
    params = []
    for prompt in prompts:
        max_tokens = body.max_tokens or state.default_max_tokens(len(prompt))
        state.check_prompt(prompt, max_tokens)
        params += [
            sampling_params(body, max_tokens=max_tokens, logprobs=body.logprobs, choice=i)
            for i in range(body.n)
        ]
    echoes = [_echo_text(state, p) if body.echo else "" for p in prompts]
    return CompletionPlan(
        id=f"cmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=state.settings.model_id,
        prompts=prompts,
        echoes=echoes,
        params=params,
        n=body.n,
    )


def _prompt_list(prompt) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt[0], int):
        return [prompt]
    return list(prompt)


def _token_ids(state: ServerState, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        return state.tokenizer.encode(prompt, add_special_tokens=True)
    return list(prompt)


def _echo_text(state: ServerState, prompt: list[int]) -> str:
    tokenizer = state.engine.tokenizer
    return tokenizer.decode(prompt, skip_special_tokens=False) if tokenizer is not None else ""


def usage(plan: CompletionPlan, finals: list[RequestOutput]) -> dict:
    prompt_tokens = sum(len(p) for p in plan.prompts)
    completion = sum(len(out.token_ids) for out in finals)
    cached = sum(finals[i * plan.n].num_cached_tokens for i in range(len(plan.prompts)))
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def completion_response(
    state: ServerState, plan: CompletionPlan, finals: list[RequestOutput]
) -> dict:
    tokenizer = state.engine.tokenizer
    choices = []
    for index, out in enumerate(finals):
        echo = plan.echoes[index // plan.n]
        choices.append(
            {
                "index": index,
                "text": echo + out.text,
                "logprobs": completion_logprobs(tokenizer, out.logprobs, len(echo)),
                "finish_reason": out.finish_reason,
            }
        )
    return {
        "id": plan.id,
        "object": "text_completion",
        "created": plan.created,
        "model": plan.model,
        "choices": choices,
        "usage": usage(plan, finals),
    }


async def stream_completion(
    state: ServerState,
    body: CompletionRequest,
    plan: CompletionPlan,
    merged: AsyncIterator[tuple[int, RequestOutput]],
) -> AsyncIterator[str]:
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    head = {
        "id": plan.id,
        "object": "text_completion",
        "created": plan.created,
        "model": plan.model,
    }
    if include_usage:
        head["usage"] = None
    tokenizer = state.engine.tokenizer
    finals: list[RequestOutput | None] = [None] * len(plan.params)
    offsets = [len(plan.echoes[i // plan.n]) for i in range(len(plan.params))]
    try:
        for index, offset in enumerate(offsets):
            if offset:
                yield _chunk(head, index, plan.echoes[index // plan.n], None, None)
        async for index, out in merged:
            logprobs = completion_logprobs(tokenizer, out.delta_logprobs, offsets[index])
            offsets[index] += len(out.delta_text)
            if out.delta_text or out.finished or logprobs:
                yield _chunk(head, index, out.delta_text, out.finish_reason, logprobs)
            if out.finished:
                finals[index] = out
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage(plan, finals)})
    except Exception as e:  # headers are sent: report in-band
        yield sse_error(e)
    finally:
        await merged.aclose()
    yield SSE_DONE


def _chunk(head: dict, index: int, text: str, reason: str | None, logprobs: dict | None) -> str:
    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}
    return sse({**head, "choices": [choice]})
