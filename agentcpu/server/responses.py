"""POST /v1/responses (OpenAI's Responses API, a subset), GET and DELETE /v1/responses/{id}.

A Responses request is turned into a chat-completions request and planned by
`chat.plan_chat` (template, tools, tool choice, structured output, sampling, context
checks); the output goes through the chat tool-call parser into Responses items
(`responses_output`).

Conversation state: with `previous_response_id`, the conversation is that response's
stored input items plus its output items, then the new input; `instructions` apply to
one turn only (as OpenAI's). Every response of a chain runs in one engine session,
`r:<id of the chain's first response>`, so its KV stays pinned and the next turn
prefills only its new tokens (a turn that is not stored, chained nor using tools pins
nothing). Stored records (`response_store`) hold the response and the whole
conversation before it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from fastapi import APIRouter, Request
from pydantic import TypeAdapter, ValidationError

from agentcpu.engine.outputs import RequestOutput
from agentcpu.errors import AgentCPUError, ChatTemplateError
from agentcpu.server.chat import ChatPlan, plan_chat
from agentcpu.server.errors import FieldError, error_response
from agentcpu.server.generation import (
    ClientDisconnected,
    SSEResponse,
    client_closed_response,
    engine_stream,
    unless_disconnected,
)
from agentcpu.server.openapi import ENDPOINT_RESPONSES
from agentcpu.server.protocol import ChatCompletionRequest
from agentcpu.server.response_store import ResponseStore
from agentcpu.server.responses_output import ResponseOutput, new_id
from agentcpu.server.responses_protocol import InputItem, ResponsesRequest
from agentcpu.server.state import ServerState, get_state

log = logging.getLogger(__name__)
router = APIRouter()

SESSION_PREFIX = "r:"  # engine session of a response chain (chat uses "s:" and "anon:")
# chat-completions field -> the Responses field it came from, for error messages
_FIELD_NAMES = {
    "messages": "input",
    "response_format": "text.format",
    "max_completion_tokens": "max_output_tokens",
}
_ITEMS = TypeAdapter(list[InputItem])
STORED_RESPONSES: dict[int | str, dict] = {
    401: ENDPOINT_RESPONSES[401],
    404: {**ENDPOINT_RESPONSES[404], "description": "no stored response has this id"},
}
_SAMPLING_EXTRAS = (
    "temperature",
    "top_p",
    "seed",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "min_tokens",
    "ignore_eos",
)


@dataclass
class Turn:
    """A planned response: its ids, the conversation it answers, the chat plan that runs it."""

    id: str
    root_id: str  # the chain's first response: names the engine session
    created_at: int
    conversation: list[dict]  # every input item so far (stored for the next turn)
    plan: ChatPlan


# ---- routes -----------------------------------------------------------------------------


@router.post(
    "/v1/responses",
    responses=ENDPOINT_RESPONSES,
    summary="Create a model response (Responses API; set stream=true for server-sent events)",
)
async def create_response(body: ResponsesRequest, request: Request):
    arrival = time.perf_counter()
    state = get_state(request)
    state.check_model(body.model)
    _refuse_unsupported(body)
    previous = None
    if body.previous_response_id is not None:
        previous = await asyncio.to_thread(_store(state).get, body.previous_response_id)
        if previous is None:
            return _not_found(body.previous_response_id, "previous_response_id")
    turn = await plan_turn(state, body, previous)
    ticket = state.admission.admit(1)
    plan = turn.plan
    session = engine_session(body, turn, previous)
    stream = engine_stream(
        state, plan.prompt, plan.params[0], turn.id, arrival, plan.constraints[0], session
    )
    output = ResponseOutput(plan.choice_outputs(body.parallel_tool_calls)[0])
    if body.stream:
        events = stream_response(state, body, turn, output, stream)
        return SSEResponse(events, on_close=ticket.release)
    try:
        final = await unless_disconnected(request, _run(stream, output))
    except ClientDisconnected:
        return client_closed_response()
    finally:
        ticket.release()
    _, response = finished_response(body, turn, output, final)
    await _save(state, body, turn, response)
    return response


@router.get("/v1/responses/{response_id}", responses=STORED_RESPONSES, summary="A stored response")
async def retrieve_response(response_id: str, request: Request):
    record = await asyncio.to_thread(_store(get_state(request)).get, response_id)
    if record is None:
        return _not_found(response_id, "response_id")
    return record["response"]


@router.delete(
    "/v1/responses/{response_id}", responses=STORED_RESPONSES, summary="Delete a stored response"
)
async def delete_response(response_id: str, request: Request):
    if not await asyncio.to_thread(_store(get_state(request)).delete, response_id):
        return _not_found(response_id, "response_id")
    return {"id": response_id, "object": "response.deleted", "deleted": True}


def engine_session(body: ResponsesRequest, turn: Turn, previous: dict | None) -> str | None:
    """The chain's engine session, which keeps this turn's KV pinned for the next. A turn
    nobody can continue by id (not stored, no chain) and without tools pins nothing;
    with tools its KV stays pinned through the tool pause, as on chat completions."""
    if body.store or previous is not None or body.tools:
        return SESSION_PREFIX + turn.root_id
    return None


def _store(state: ServerState) -> ResponseStore:
    if state.responses is None:
        raise RuntimeError("this app has no response store (create_app makes one)")
    return state.responses


def _not_found(response_id: str, param: str):
    message = f"response with id {response_id!r} not found"
    if param == "previous_response_id":
        message = f"previous_response_id: {message} (never stored, deleted, or expired)"
    return error_response(404, message, param=param, code="response_not_found")


def _refuse_unsupported(body: ResponsesRequest) -> None:
    if body.background:
        raise FieldError("background", "background responses are not supported")
    if body.truncation == "auto":
        raise FieldError("truncation", "only 'disabled' is supported")
    if body.top_logprobs:
        raise FieldError("top_logprobs", "logprobs are not supported on /v1/responses")


# ---- planning ---------------------------------------------------------------------------


async def plan_turn(state: ServerState, body: ResponsesRequest, previous: dict | None) -> Turn:
    history = (
        previous["conversation"] + _as_input(previous["response"]["output"]) if previous else []
    )
    conversation = history + new_items(body.input)
    chat_body = chat_request(body, chat_messages(body.instructions, conversation))
    try:
        plan = await plan_chat(state, chat_body)
    except FieldError as e:
        name = _FIELD_NAMES.get(e.param, e.param)
        raise FieldError(name, str(e).removeprefix(f"{e.param}: ")) from None
    except ChatTemplateError as e:
        raise FieldError("input", str(e)) from None
    response_id = new_id("resp")
    return Turn(
        id=response_id,
        root_id=previous["root_id"] if previous else response_id,
        created_at=int(time.time()),
        conversation=conversation,
        plan=plan,
    )


def new_items(value: str | list) -> list[dict]:
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    return [item.model_dump(by_alias=True) for item in value]


def _as_input(output: list[dict]) -> list[dict]:
    """Output items as input items (ids, statuses and annotations dropped)."""
    return [item.model_dump(by_alias=True) for item in _ITEMS.validate_python(output)]


def chat_messages(instructions: str | None, conversation: list[dict]) -> list[dict]:
    """Chat messages for the template: function calls join the assistant message before
    them, their outputs become tool messages."""
    if not conversation:
        raise FieldError("input", "the conversation is empty: give at least one input item")
    messages: list[dict] = [{"role": "system", "content": instructions}] if instructions else []
    calls: set[str] = set()
    for item in conversation:
        if item["type"] == "message":
            messages.append({"role": item["role"], "content": _text(item["content"])})
        elif item["type"] == "function_call":
            calls.add(item["call_id"])
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            if item["call_id"] not in calls:
                raise FieldError(
                    "input",
                    f"function_call_output with call_id {item['call_id']!r} follows no "
                    "function_call with that call_id",
                )
            content = _text(item["output"])
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": content})
    return messages


def _text(content: str | list[dict]) -> str:
    return content if isinstance(content, str) else "\n".join(p["text"] for p in content)


def chat_request(body: ResponsesRequest, messages: list[dict]) -> ChatCompletionRequest:
    fields = {name: getattr(body, name) for name in _SAMPLING_EXTRAS}
    fields.update(
        messages=messages,
        max_completion_tokens=body.max_output_tokens,
        parallel_tool_calls=body.parallel_tool_calls,
        response_format=_response_format(body),
    )
    if body.tools:
        fields["tools"] = [
            {"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
            for t in body.tools
        ]
    if body.tool_choice is not None:
        choice = body.tool_choice
        fields["tool_choice"] = (
            choice
            if isinstance(choice, str)
            else {"type": "function", "function": {"name": choice.name}}
        )
    try:
        return ChatCompletionRequest.model_validate(fields)
    except ValidationError as e:  # the Responses model checked the same bounds: unexpected
        raise FieldError("input", f"cannot be served as a chat: {e.errors()[0]['msg']}") from e


def _response_format(body: ResponsesRequest) -> dict | None:
    form = body.text.format if body.text is not None else None
    if form is None or form.type == "text":
        return None
    if form.type == "json_object":
        return {"type": "json_object"}
    schema = form.model_dump(by_alias=True, exclude={"type"}, exclude_none=True)
    return {"type": "json_schema", "json_schema": schema}


# ---- answers ----------------------------------------------------------------------------


async def _run(stream: AsyncIterator[RequestOutput], output: ResponseOutput) -> RequestOutput:
    final = None
    async with aclosing(stream) as outs:
        async for out in outs:
            output.feed(out)
            final = out
    return final  # type: ignore[return-value]


def response_object(
    body: ResponsesRequest, turn: Turn, status: str, output: list[dict], usage: dict | None
) -> dict:
    incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
    completed_at = int(time.time()) if status == "completed" else None
    text_format = body.text.format if body.text is not None else None
    return {
        "id": turn.id,
        "object": "response",
        "created_at": turn.created_at,
        "completed_at": completed_at,
        "status": status,
        "error": None,
        "incomplete_details": incomplete,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "model": turn.plan.model,
        "output": output,
        "parallel_tool_calls": body.parallel_tool_calls,
        "previous_response_id": body.previous_response_id,
        "store": body.store,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "text": {
            "format": text_format.model_dump(by_alias=True, exclude_none=True)
            if text_format is not None
            else {"type": "text"}
        },
        "tool_choice": _echo_tool_choice(body),
        "tools": [t.model_dump() for t in body.tools or ()],
        "truncation": "disabled",
        "usage": usage,
        "user": body.user,
        "metadata": body.metadata or {},
    }


def _echo_tool_choice(body: ResponsesRequest):
    choice = body.tool_choice
    if choice is None:
        return "auto"
    return choice if isinstance(choice, str) else choice.model_dump()


def usage(turn: Turn, final: RequestOutput) -> dict:
    prompt, output = len(turn.plan.prompt), len(final.token_ids)
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": final.num_cached_tokens},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + output,
    }


def finished_response(
    body: ResponsesRequest, turn: Turn, output: ResponseOutput, final: RequestOutput
) -> tuple[list[dict], dict]:
    """(the done events, the response) once the engine has finished."""
    status = "incomplete" if final.finish_reason == "length" else "completed"
    events = output.finish(status)
    return events, response_object(body, turn, status, output.items, usage(turn, final))


async def _save(state: ServerState, body: ResponsesRequest, turn: Turn, response: dict) -> None:
    if not body.store:
        return
    record = {"response": response, "conversation": turn.conversation, "root_id": turn.root_id}
    try:
        await asyncio.to_thread(_store(state).put, turn.id, record)
    except OSError:  # the answer is made: deliver it, but say why it cannot be continued
        log.exception("could not store response %s", turn.id)


async def stream_response(
    state: ServerState,
    body: ResponsesRequest,
    turn: Turn,
    output: ResponseOutput,
    stream: AsyncIterator[RequestOutput],
) -> AsyncIterator[str]:
    numbers = itertools.count()

    def event(payload: dict) -> str:
        payload["sequence_number"] = next(numbers)
        data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
        return f"event: {payload['type']}\ndata: {data}\n\n"

    started = response_object(body, turn, "in_progress", [], None)
    try:
        yield event({"type": "response.created", "response": started})
        yield event({"type": "response.in_progress", "response": started})
        final = None
        async with aclosing(stream) as outs:
            async for out in outs:
                for payload in output.feed(out):
                    yield event(payload)
                final = out
        events, response = finished_response(body, turn, output, final)  # type: ignore[arg-type]
        for payload in events:
            yield event(payload)
        await _save(state, body, turn, response)  # before the client can ask for it
        kind = "completed" if response["status"] == "completed" else "incomplete"
        yield event({"type": f"response.{kind}", "response": response})
    except Exception as e:  # headers are sent: report in-band, as OpenAI does
        code = "invalid_request_error" if isinstance(e, AgentCPUError) else "server_error"
        yield event({"type": "error", "code": code, "message": str(e), "param": None})
    finally:
        await stream.aclose()
