"""POST /v1/chat/completions: render the template, tokenize, generate n choices, parse
tool calls, answer whole or as server-sent events."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import APIRouter, Request

from agentcpu.engine.outputs import RequestOutput
from agentcpu.engine.sampling_params import SamplingParams
from agentcpu.server import tooling
from agentcpu.server.chat_output import ChatChoiceOutput, finish_reason
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
from agentcpu.server.logprobs import chat_logprobs
from agentcpu.server.openapi import ENDPOINT_RESPONSES
from agentcpu.server.protocol import ChatCompletionRequest, ChatCompletionResponse
from agentcpu.server.sessions import named_session
from agentcpu.server.state import ServerState, get_state
from agentcpu.tools.parsers import tool_markers_are_special

router = APIRouter()


@dataclass
class ChatPlan:
    """Everything decided before the engine sees the request."""

    id: str
    created: int
    model: str
    prompt: list[int]
    params: list[SamplingParams]
    constraints: list
    tools: list[dict] | None
    tool_format: str | None  # None: no tool-call parsing

    def choice_outputs(self, parallel_tool_calls: bool) -> list[ChatChoiceOutput]:
        return [
            ChatChoiceOutput(self._parser(), parallel_tool_calls)
            for _ in self.params
        ]

    def _parser(self):
        if self.tool_format is None:
            return None
        return tooling.make_tool_parser(self.tool_format, self.tools)


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses=ENDPOINT_RESPONSES,
    summary="Create a chat completion (set stream=true for server-sent events)",
)
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    arrival = time.perf_counter()
    state = get_state(request)
    state.check_model(body.model)
    if body.server_tools is not None or body.max_turns is not None:
        from agentcpu.server.agent_run import create_agent_completion  # it imports this module

        return await create_agent_completion(state, body, request, arrival)
    plan = await plan_chat(state, body)
    ticket = state.admission.admit(len(plan.params))
    session = session_id(request, body, plan)
    pin_ttl = client_tool_pin_ttl(state, body, plan)
    streams = [
        engine_stream(
            state, plan.prompt, params, f"{plan.id}-{i}", arrival, constraint,
            session if i == 0 else None, pin_ttl,
        )
        for i, (params, constraint) in enumerate(zip(plan.params, plan.constraints, strict=True))
    ]
    merged = merge_streams(streams)
    if body.stream:
        outputs = plan.choice_outputs(body.parallel_tool_calls)  # fails here, not mid-stream
        events = stream_chat(state, body, plan, outputs, merged)
        return SSEResponse(events, on_close=ticket.release)
    try:
        finals = await unless_disconnected(request, final_outputs(merged, len(streams)))
    except ClientDisconnected:
        return client_closed_response()
    finally:
        ticket.release()
    return chat_response(state, body, plan, finals)


# ---- planning -------------------------------------------------------------------------


def session_id(request: Request, body: ChatCompletionRequest, plan: ChatPlan) -> str | None:
    """The agent session whose KV this turn keeps: the X-Session-Id header, else the
    `session_id` or `user` field. A tool-using request without one still pins its KV under
    its own id (released by TTL or memory pressure), so plain OpenAI clients running an
    agent loop keep their history cached through the tool pause."""
    return named_session(request, body) or (f"anon:{plan.id}" if plan.tools else None)


def client_tool_pin_ttl(state: ServerState, body: ChatCompletionRequest, plan: ChatPlan) -> float | None:
    """Count the tool results this request brings back (how long the client's tools
    took), then the pin TTL for this turn: from the offered tools' recent latency, or
    None (the engine's default) before any is known."""
    state.tool_pauses.results_seen(
        {"role": m.role, "tool_call_id": getattr(m, "tool_call_id", None)} for m in body.messages
    )
    if not plan.tools:
        return None
    return state.tool_pauses.pin_ttl(t["function"]["name"] for t in plan.tools if "function" in t)


async def plan_chat(state: ServerState, body: ChatCompletionRequest) -> ChatPlan:
    refuse_unsupported(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise FieldError("top_logprobs", "requires logprobs: true")
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    tool_choice = _tool_choice(body, tools)
    text = state.tokenizer.apply_chat_template(
        template_messages(body), tools=tools, add_generation_prompt=True
    )
    prompt = state.tokenizer.encode(text, add_special_tokens=False)
    max_tokens = (
        body.max_completion_tokens or body.max_tokens or state.default_max_tokens(len(prompt))
    )
    state.check_prompt(prompt, max_tokens)
    top = (body.top_logprobs or 0) if body.logprobs else None
    params = [
        sampling_params(body, max_tokens=max_tokens, logprobs=top, choice=i) for i in range(body.n)
    ]
    tool_format = _tool_format(state, tools, tool_choice)
    if tool_markers_are_special(state.tokenizer, tool_format):
        # the trigger (`[TOOL_CALLS]`, `<|python_tag|>`) is a special token: keep special
        # tokens in the decoded text, or the parser would never see it
        for p in params:
            p.skip_special_tokens = False
    constraints = await _constraints(state, body, tools, tool_choice, tool_format)
    return ChatPlan(
        id=f"chatcmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=state.settings.model_id,
        prompt=prompt,
        params=params,
        constraints=constraints,
        tools=tools,
        tool_format=tool_format,
    )


def _tool_choice(body: ChatCompletionRequest, tools: list[dict] | None) -> str | dict:
    choice = body.tool_choice
    if choice is None:
        return "auto" if tools else "none"
    if isinstance(choice, str):
        if choice == "required" and not tools:
            raise FieldError("tool_choice", "'required' needs at least one tool in tools")
        return choice
    names = [t["function"]["name"] for t in tools or []]
    if choice.function.name not in names:
        raise FieldError(
            "tool_choice", f"names {choice.function.name!r}, which is not in tools {names}"
        )
    return choice.model_dump()


def _tool_format(
    state: ServerState, tools: list[dict] | None, tool_choice: str | dict
) -> str | None:
    if not tools or tool_choice == "none":
        return None
    if state.tool_format is None and tool_choice != "auto":
        raise FieldError(
            "tool_choice",
            "this model's chat template has no known tool-call format, so calls cannot be forced",
        )
    return state.tool_format


async def _constraints(state, body, tools, tool_choice, tool_format) -> list:
    response_format = body.response_format
    wants_json = response_format is not None and response_format.type != "text"
    if not body.constrain_tool_calls:
        tool_format = None
    if not wants_json and tool_format is None:
        return [None] * body.n
    kwargs = dict(
        response_format=response_format.model_dump(by_alias=True, exclude_none=True)
        if wants_json
        else None,
        tools=tools if tool_format is not None else None,
        tool_choice=tool_choice,
        tool_format=tool_format,
    )

    def build() -> list:  # grammar compilation can take a while: off the event loop
        return [
            tooling.make_constraint(state.tokenizer, state.vocab_size, **kwargs)
            for _ in range(body.n)
        ]

    return await asyncio.to_thread(build)


def template_messages(body: ChatCompletionRequest) -> list[dict]:
    """Messages as chat templates expect them: text parts joined, `developer` as system,
    tool-call arguments decoded to objects (templates `tojson` them)."""
    messages = []
    for message in body.messages:
        m = message.model_dump(exclude_none=True)
        if m["role"] == "developer":
            m["role"] = "system"
        if isinstance(m.get("content"), list):
            m["content"] = "\n".join(part["text"] for part in m["content"])
        if m["role"] == "assistant" and not m.get("tool_calls"):
            m.setdefault("content", "")
        for call in m.get("tool_calls", ()):
            call["function"]["arguments"] = _decoded(call["function"]["arguments"])
        messages.append(m)
    return messages


def _decoded(arguments: str):
    try:
        value = json.loads(arguments)
    except ValueError:
        return arguments
    return value if isinstance(value, dict) else arguments


# ---- answers ---------------------------------------------------------------------------


def usage(plan: ChatPlan, finals: list[RequestOutput]) -> dict:
    completion = sum(len(out.token_ids) for out in finals)
    return {
        "prompt_tokens": len(plan.prompt),
        "completion_tokens": completion,
        "total_tokens": len(plan.prompt) + completion,
        "prompt_tokens_details": {"cached_tokens": finals[0].num_cached_tokens},
    }


def chat_response(
    state: ServerState, body: ChatCompletionRequest, plan: ChatPlan, finals: list[RequestOutput]
) -> dict:
    choices = []
    for index, (out, output) in enumerate(
        zip(finals, plan.choice_outputs(body.parallel_tool_calls), strict=True)
    ):
        content, tool_calls = output.complete(out)
        state.tool_pauses.calls_issued(output.issued_calls)
        choices.append(
            {
                "index": index,
                "message": {"role": "assistant", "content": content, "tool_calls": tool_calls},
                "logprobs": chat_logprobs(state.engine.tokenizer, out.logprobs),
                "finish_reason": finish_reason(out.finish_reason, output.made_tool_calls),
            }
        )
    return {
        "id": plan.id,
        "object": "chat.completion",
        "created": plan.created,
        "model": plan.model,
        "choices": choices,
        "usage": usage(plan, finals),
    }


async def stream_chat(
    state: ServerState,
    body: ChatCompletionRequest,
    plan: ChatPlan,
    outputs: list[ChatChoiceOutput],
    merged: AsyncIterator[tuple[int, RequestOutput]],
) -> AsyncIterator[str]:
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    head = {
        "id": plan.id,
        "object": "chat.completion.chunk",
        "created": plan.created,
        "model": plan.model,
    }
    if include_usage:
        head["usage"] = None

    def chunk(index: int, delta: dict, reason=None, logprobs=None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        return sse({**head, "choices": [choice]})

    finals: list[RequestOutput | None] = [None] * len(outputs)
    tokenizer = state.engine.tokenizer
    try:
        for index in range(len(outputs)):
            yield chunk(index, {"role": "assistant", "content": ""})
        async for index, out in merged:
            output = outputs[index]
            delta = output.delta(out)
            reason = (
                finish_reason(out.finish_reason, output.made_tool_calls) if out.finished else None
            )
            logprobs = chat_logprobs(tokenizer, out.delta_logprobs)
            if delta or reason or logprobs:
                yield chunk(index, delta, reason, logprobs)
            if out.finished:
                finals[index] = out
                state.tool_pauses.calls_issued(output.issued_calls)
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage(plan, finals)})
    except Exception as e:  # headers are sent: report in-band, as OpenAI does
        yield sse_error(e)
    finally:
        await merged.aclose()
    yield SSE_DONE
