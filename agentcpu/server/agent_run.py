"""Chat completions with `server_tools`: the server runs the agent loop itself.

A request names tools this server registered (`server_tools.py`), or "all", and may set
`max_turns`. The server then runs `agents/loop.py` on the request's messages: model turn
-> tool calls -> the server runs them -> results appended -> next turn, until a turn makes
no call or `max_turns` turns have run. Every turn uses one session id (the client's, or
an anonymous one), so the KV stays pinned through the tool pauses and each turn prefills
only what was appended. The run holds one admission slot from start to end; a client
that leaves aborts the turn in flight (freeing its KV) and ends the run.

The answer is a chat.completion whose message is the final turn's text and whose usage
sums all turns, plus an `agent` field: turns, finish_reason ("stop", "max_turns", or
"length" when the conversation outgrew the context), the tool calls with their results
(clipped), per-turn usage, and the messages the run appended in request form, so a client
can continue the conversation. Streamed: every turn's text as content deltas, each tool
call and result as a chunk with an empty delta and an `agent_event` field (OpenAI
clients pass over it), and a last chunk with the finish reason and the `agent` summary.

`tool_choice` holds for the first turn only (e.g. to force the opening call). Client
`tools` in the same request, `n` > 1, `logprobs`, `response_format` and
`parallel_tool_calls: false` are refused (400).
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from agentcpu.agents.loop import AgentEvent, AgentLoop, AgentRun
from agentcpu.engine.sampling_params import SamplingParams
from agentcpu.errors import CapacityError, ContextLengthError
from agentcpu.server.chat import template_messages
from agentcpu.server.errors import FieldError
from agentcpu.server.generation import (
    SSE_DONE,
    ClientDisconnected,
    SSEResponse,
    client_closed_response,
    engine_stream,
    refuse_unsupported,
    sampling_params,
    sse,
    sse_error,
    unless_disconnected,
)
from agentcpu.server.metrics import ServerMetrics
from agentcpu.server.protocol import ChatCompletionRequest
from agentcpu.server.server_tools import require_tools
from agentcpu.server.sessions import named_session
from agentcpu.server.state import ServerState

# A tool result as the `agent` trace shows it; the model reads it whole (up to the
# executor's own bound).
MAX_TRACE_CONTENT_CHARS = 2_000
ANONYMOUS_SESSION_PREFIX = "anon:"


@dataclass
class AgentPlan:
    """Everything decided before the first turn."""

    id: str
    created: int
    model: str
    messages: list[dict]
    tool_names: list[str]
    tool_choice: str | dict  # for the first turn
    params: SamplingParams
    max_tokens: int | None  # per turn; None: whatever room each turn's prompt leaves
    max_turns: int
    session_id: str


async def create_agent_completion(
    state: ServerState, body: ChatCompletionRequest, request: Request, arrival: float
) -> Response:
    plan = plan_agent(state, body, request)
    loop = ServerAgentLoop(state, plan, arrival)
    trace = AgentTrace(state.metrics, plan.tool_names, len(plan.messages))
    ticket = state.admission.admit(1)  # a run has one engine request at a time
    if body.stream:
        return SSEResponse(stream_agent(body, plan, loop, trace), on_close=ticket.release)
    try:
        await unless_disconnected(request, _drain(agent_events(plan, loop, trace)))
    except ClientDisconnected:
        return client_closed_response()
    finally:
        ticket.release()
    return JSONResponse(agent_response(plan, trace))


# ---- planning -------------------------------------------------------------------------


def plan_agent(state: ServerState, body: ChatCompletionRequest, request: Request) -> AgentPlan:
    refuse_unsupported(body)
    if body.server_tools is None:
        raise FieldError("max_turns", "applies only to requests with server_tools")
    tools = require_tools(state.tools)
    _refuse_with_server_tools(body)
    if state.tool_format is None:
        raise FieldError("server_tools", "this model's chat template has no known tool-call format")
    names = tools.resolve(body.server_tools)
    messages = template_messages(body)
    schemas = tools.registry.schemas(names)
    text = state.tokenizer.apply_chat_template(messages, tools=schemas, add_generation_prompt=True)
    prompt = state.tokenizer.encode(text)
    requested = body.max_completion_tokens or body.max_tokens
    first_max_tokens = requested or state.default_max_tokens(len(prompt))
    state.check_prompt(prompt, first_max_tokens)  # later turns: checked as they come
    run_id = f"chatcmpl-{uuid.uuid4().hex}"
    return AgentPlan(
        id=run_id,
        created=int(time.time()),
        model=state.settings.model_id,
        messages=messages,
        tool_names=names,
        tool_choice=_first_tool_choice(body, names),
        params=sampling_params(body, max_tokens=first_max_tokens, logprobs=None, choice=0),
        max_tokens=requested,
        max_turns=body.max_turns or tools.max_turns,
        session_id=_session_id(request, body, run_id),
    )


def _refuse_with_server_tools(body: ChatCompletionRequest) -> None:
    wants_json = body.response_format is not None and body.response_format.type != "text"
    refusals = (
        ("tools", bool(body.tools), "mixing client tools with server_tools is not supported"),
        ("n", body.n > 1, "a server_tools run has one choice: n must be 1"),
        ("logprobs", body.logprobs, "is not supported with server_tools"),
        ("response_format", wants_json, "is not supported with server_tools"),
        ("parallel_tool_calls", not body.parallel_tool_calls, "false is not supported here"),
    )
    for param, refused, message in refusals:
        if refused:
            raise FieldError(param, message)


def _first_tool_choice(body: ChatCompletionRequest, names: list[str]) -> str | dict:
    choice = body.tool_choice
    if choice is None:
        return "auto"
    if isinstance(choice, str):
        return choice
    if choice.function.name not in names:
        raise FieldError(
            "tool_choice", f"names {choice.function.name!r}, which is not in server_tools {names}"
        )
    return choice.model_dump()


def _session_id(request: Request, body: ChatCompletionRequest, run_id: str) -> str:
    """As for plain chat turns (`chat.session_id`); a run without one pins anonymously."""
    return named_session(request, body) or f"{ANONYMOUS_SESSION_PREFIX}{run_id}"


# ---- the run --------------------------------------------------------------------------


class ServerAgentLoop(AgentLoop):
    """The agent loop, each turn checked against the context and recorded in metrics."""

    def __init__(self, state: ServerState, plan: AgentPlan, arrival: float):
        super().__init__(
            state.front,
            state.tokenizer,
            state.tools.executor,
            tool_format=state.tool_format,
            max_turns=plan.max_turns,
            tool_names=plan.tool_names,
        )
        self.state = state
        self.plan = plan
        self._arrival: float | None = arrival  # the first turn's time to first token counts it

    async def _generate(self, prompt_ids, params, request_id, constraint, session_id):
        max_tokens = self.plan.max_tokens or self.state.default_max_tokens(len(prompt_ids))
        self.state.check_prompt(prompt_ids, max_tokens)
        params = dataclasses.replace(params, max_tokens=max_tokens)
        arrival, self._arrival = self._arrival or time.perf_counter(), None
        stream = engine_stream(
            self.state,
            prompt_ids,
            params,
            request_id,
            arrival,
            constraint,
            session_id,
            self._pin_ttl(),
        )
        async with aclosing(stream) as outs:
            async for out in outs:
                yield out


@dataclass
class AgentTrace:
    """What a run did, gathered from its events: the answer's `agent` field."""

    metrics: ServerMetrics
    offered: list[str]
    first_new_message: int  # run.messages from here on were appended by the run
    run: AgentRun = field(default_factory=lambda: AgentRun(messages=[]))
    tool_calls: list[dict] = field(default_factory=list)

    def record(self, event: AgentEvent) -> dict | None:
        """Note a tool event; returns its `agent_event` payload (None for other events)."""
        data = event.data
        if event.type == "tool_call":
            entry = {
                "turn": event.turn,
                "id": data["id"],
                "name": data["name"],
                "arguments": arguments_text(data["arguments"]),
            }
            self.tool_calls.append(entry)
            return {"type": "tool_call", **entry}
        if event.type == "tool_result":
            entry = next(c for c in self.tool_calls if c["id"] == data["id"] and "ok" not in c)
            entry.update(ok=data["ok"], content=_clipped(data["content"]))
            self._count(data["name"], data["ok"])
            return {"type": "tool_result", "turn": event.turn, **entry}
        return None

    def _count(self, name: str, ok: bool) -> None:
        label = name if name in self.offered else "(not offered)"
        self.metrics.tool_calls.labels(tool=label).inc()
        if not ok:
            self.metrics.tool_errors.labels(tool=label).inc()

    def usage(self) -> dict:
        run = self.run
        return {
            "prompt_tokens": run.prompt_tokens,
            "completion_tokens": run.completion_tokens,
            "total_tokens": run.prompt_tokens + run.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": run.cached_tokens},
        }

    def choice_finish_reason(self) -> str:
        """OpenAI's reason: "stop" for an answer, "length" for a run or turn cut short."""
        turns = self.run.turn_usage
        cut = not turns or turns[-1].finish_reason == "length"
        return "stop" if self.run.finish_reason == "stop" and not cut else "length"

    def summary(self, with_messages: bool) -> dict:
        summary = {
            "turns": len(self.run.turn_usage),
            "finish_reason": self.run.finish_reason,
            "tool_calls": self.tool_calls,
            "usage": self.usage(),
            "turn_usage": [dataclasses.asdict(t) for t in self.run.turn_usage],
        }
        if with_messages:
            appended = self.run.messages[self.first_new_message :]
            summary["messages"] = [request_message(m) for m in appended]
        return summary


async def agent_events(
    plan: AgentPlan, loop: ServerAgentLoop, trace: AgentTrace
) -> AsyncIterator[tuple[AgentEvent, dict | None]]:
    """The run's events, each with its `agent_event` payload (or None), noted in `trace`.
    A later turn that no longer fits the context ends the run with "length"."""
    outcome = "abort"  # what a run that ends without a finish reason is counted as
    run = loop.run(plan.messages, plan.params, plan.session_id, trace.run, plan.tool_choice)
    try:
        async with aclosing(run) as events:
            async for event in events:
                yield event, trace.record(event)
    except (ContextLengthError, CapacityError):
        if not trace.run.turn_usage:  # the first turn's prompt was checked in planning
            outcome = "error"
            raise
        trace.run.finish_reason = "length"
    except Exception:
        outcome = "error"
        raise
    finally:
        trace.metrics.agent_runs.labels(finish_reason=trace.run.finish_reason or outcome).inc()


async def _drain(events: AsyncIterator[Any]) -> None:
    async with aclosing(events):
        async for _ in events:
            pass


# ---- answers ---------------------------------------------------------------------------


def _head(plan: AgentPlan, kind: str) -> dict:
    return {"id": plan.id, "object": kind, "created": plan.created, "model": plan.model}


def agent_response(plan: AgentPlan, trace: AgentTrace) -> dict:
    message = {"role": "assistant", "content": trace.run.final_text, "tool_calls": []}
    choice = {
        "index": 0,
        "message": message,
        "logprobs": None,
        "finish_reason": trace.choice_finish_reason(),
    }
    return {
        **_head(plan, "chat.completion"),
        "choices": [choice],
        "usage": trace.usage(),
        "agent": trace.summary(with_messages=True),
    }


async def stream_agent(
    body: ChatCompletionRequest, plan: AgentPlan, loop: ServerAgentLoop, trace: AgentTrace
) -> AsyncIterator[str]:
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    head = _head(plan, "chat.completion.chunk")
    if include_usage:
        head["usage"] = None

    def chunk(delta: dict, reason: str | None = None, **extension: Any) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        return sse({**head, "choices": [choice], **extension})

    try:
        yield chunk({"role": "assistant", "content": ""})
        async with aclosing(agent_events(plan, loop, trace)) as events:
            async for event, agent_event in events:
                if event.type == "text":
                    yield chunk({"content": event.data["delta"]})
                elif agent_event is not None:
                    yield chunk({}, agent_event=agent_event)
        yield chunk({}, trace.choice_finish_reason(), agent=trace.summary(with_messages=False))
        if include_usage:
            yield sse({**head, "choices": [], "usage": trace.usage()})
    except Exception as e:  # headers are sent: report in-band, as OpenAI does
        yield sse_error(e)
    yield SSE_DONE


def arguments_text(arguments: Any) -> str:
    """Tool-call arguments as OpenAI carries them: JSON text."""
    if isinstance(arguments, str):
        return arguments
    return json.dumps({} if arguments is None else arguments, ensure_ascii=False)


def request_message(message: dict) -> dict:
    """A message of the run as a client would send it back (arguments as JSON text)."""
    if not message.get("tool_calls"):
        return message
    calls = [
        {
            **c,
            "function": {**c["function"], "arguments": arguments_text(c["function"]["arguments"])},
        }
        for c in message["tool_calls"]
    ]
    return {**message, "tool_calls": calls}


def _clipped(content: str) -> str:
    cut = len(content) - MAX_TRACE_CONTENT_CHARS
    return content if cut <= 0 else f"{content[:MAX_TRACE_CONTENT_CHARS]}... [{cut} characters cut]"
