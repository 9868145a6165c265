"""The server-side agent loop: model turn -> tool calls -> tools run -> results appended
-> next turn, until a turn makes no tool call or `max_turns` is reached.

Every turn of a run uses the same session id, so the engine pins the session's KV while
its tools run (TTL from the tools' recent latency) and the next turn prefills only the
appended tool results. Tool failures come back to the model as error text, never as an
exception out of the loop.

The server runs this loop for chat requests with `server_tools` (`server/agent_run.py`,
which routes each turn through its own `_generate`); `agentcpu demo` runs it directly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from agentcpu.agents.pin_ttl import pin_ttl_from_latencies
from agentcpu.engine.async_engine import AsyncEngine
from agentcpu.engine.sampling_params import SamplingParams
from agentcpu.tools.executor import ToolCall, ToolExecutor
from agentcpu.tools.registry import ToolResult


@dataclass
class AgentEvent:
    """One thing that happened: "text" (delta), "tool_call", "tool_result", "final"."""

    type: str
    turn: int
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TurnUsage:
    """One model turn's tokens and how its generation ended ("stop", "length", ...)."""

    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    finish_reason: str | None


@dataclass
class AgentRun:
    """Totals of one run, filled as it goes."""

    messages: list[dict[str, Any]]
    final_text: str = ""
    turns: int = 0
    finish_reason: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    turn_usage: list[TurnUsage] = field(default_factory=list)


class AgentLoop:
    def __init__(
        self,
        engine: AsyncEngine,
        tokenizer,
        executor: ToolExecutor,
        *,
        tool_format: str | None,
        constrain_tool_calls: bool = True,
        max_turns: int = 8,
        tool_names: list[str] | None = None,
    ):
        """`tool_names`: the registered tools this loop offers (None: all of them)."""
        self.engine = engine
        self.tokenizer = tokenizer
        self.executor = executor
        self.tool_format = tool_format
        self.constrain = constrain_tool_calls
        self.max_turns = max_turns
        self.tool_names = None if tool_names is None else list(tool_names)
        self._ids = itertools.count()
        self._loop_id = uuid.uuid4().hex[:8]  # two loops on one session never share a request id

    async def run(
        self,
        messages: list[dict[str, Any]],
        params: SamplingParams,
        session_id: str | None = None,
        run: AgentRun | None = None,
        tool_choice: str | dict = "auto",
    ) -> AsyncIterator[AgentEvent]:
        """Run the loop on a copy of `messages`; `run` (if given) collects the totals.

        `tool_choice` (OpenAI's: "auto", "none", "required" or a named function) holds for
        the first turn only, so a caller can force the opening call; later turns are "auto".
        """
        run = run or AgentRun(messages=[])
        run.messages = list(messages)
        session_id = session_id or f"agent-{uuid.uuid4().hex[:12]}"
        tools = self.executor.registry.schemas(self.tool_names)
        for turn in range(self.max_turns):
            run.turns = turn + 1
            reply = {}
            choice = tool_choice if turn == 0 else "auto"
            turn_events = self._model_turn(run, tools, params, session_id, turn, reply, choice)
            async with aclosing(turn_events) as events:
                async for event in events:
                    yield event
            run.messages.append(reply["message"])
            if not reply["calls"]:
                run.final_text, run.finish_reason = reply["message"].get("content") or "", "stop"
                yield AgentEvent("final", turn, {"content": run.final_text})
                return
            async with aclosing(self._run_tools(run, reply["calls"], turn)) as events:
                async for event in events:
                    yield event
        run.finish_reason = "max_turns"
        yield AgentEvent(
            "final", self.max_turns - 1, {"content": run.final_text, "max_turns": True}
        )

    async def _model_turn(self, run, tools, params, session_id, turn, reply, tool_choice):
        from agentcpu.tools.parsers import ToolCallParser, tool_markers_are_special

        prompt = self.tokenizer.apply_chat_template(
            run.messages, tools=tools, add_generation_prompt=True
        )
        prompt_ids = self.tokenizer.encode(prompt)
        tool_format = None if tool_choice == "none" else self.tool_format
        parser = ToolCallParser(tool_format, tools) if tool_format else None
        if tool_markers_are_special(self.tokenizer, tool_format):  # keep them visible
            params = dataclasses.replace(params, skip_special_tokens=False)
        constraint = await self._constraint(tools, tool_choice)
        request_id = f"{session_id}-{self._loop_id}-t{turn}-{next(self._ids)}"
        out = None
        async with aclosing(
            self._generate(prompt_ids, params, request_id, constraint, session_id)
        ) as outs:
            async for out in outs:
                text = parser.feed(out.delta_text).content if parser else out.delta_text
                if text:
                    yield AgentEvent("text", turn, {"delta": text})
        run.prompt_tokens += len(prompt_ids)
        run.cached_tokens += out.num_cached_tokens
        run.completion_tokens += len(out.token_ids)
        run.turn_usage.append(
            TurnUsage(len(prompt_ids), out.num_cached_tokens, len(out.token_ids), out.finish_reason)
        )
        content, calls = (out.text, []) if parser is None else _parsed(parser.finish())
        reply["calls"] = calls
        reply["message"] = _assistant_message(content, calls)

    async def _run_tools(self, run: AgentRun, calls: list[ToolCall], turn: int):
        for call in calls:
            yield AgentEvent(
                "tool_call", turn, {"id": call.id, "name": call.name, "arguments": call.arguments}
            )
        results = await self._results(calls)
        for call, result in zip(calls, results, strict=True):
            run.tool_calls += 1
            run.tool_errors += not result.ok
            run.messages.append(
                {
                    "role": "tool",
                    "tool_call_id": call.id,
                    "name": call.name,
                    "content": result.content,
                }
            )
            yield AgentEvent(
                "tool_result",
                turn,
                {"id": call.id, "name": call.name, "ok": result.ok, "content": result.content},
            )

    def _generate(self, prompt_ids, params, request_id, constraint, session_id) -> AsyncIterator:
        """One turn's engine outputs; the server overrides this to add its checks and metrics."""
        return self.engine.generate(
            prompt_ids,
            params,
            request_id,
            constraint=constraint,
            session_id=session_id,
            pin_ttl_s=self._pin_ttl(),
        )

    async def _results(self, calls: list[ToolCall]) -> list[ToolResult]:
        """The calls' results; a call of a registered tool this loop does not offer fails."""
        if self.tool_names is None:
            return await self.executor.run_all(calls)
        offered = [c for c in calls if c.name in self.tool_names]
        ran = iter(await self.executor.run_all(offered))
        refusal = f"not one of the tools offered here ({', '.join(self.tool_names)})"
        return [
            next(ran)
            if c.name in self.tool_names
            else ToolResult(ok=False, content=f"error: {c.name!r} is {refusal}")
            for c in calls
        ]

    async def _constraint(self, tools, tool_choice):
        """Tool calls valid by construction; a forced choice is constrained even when
        `constrain_tool_calls` is off, as nothing else can force it."""
        free = tool_choice == "auto" and not self.constrain
        if free or tool_choice == "none" or not tools or not self.tool_format:
            return None
        from agentcpu.structured import build_constraint

        vocab = self.engine.engine.config.model_config.vocab_size
        # grammar compilation can take a while: off the event loop
        return await asyncio.to_thread(
            build_constraint,
            self.tokenizer,
            vocab,
            response_format=None,
            tools=tools,
            tool_choice=tool_choice,
            tool_format=self.tool_format,
        )

    def _pin_ttl(self) -> float | None:
        """A few times the slowest recent tool latency, clamped; None: engine default."""
        names = self.executor.registry.names() if self.tool_names is None else self.tool_names
        return pin_ttl_from_latencies(self.executor.latency_ema(name) for name in names)


def _parsed(result) -> tuple[str, list[ToolCall]]:
    calls = [ToolCall(name=c.name, arguments=c.arguments, id=c.id) for c in result.tool_calls]
    return result.content or "", calls


def _assistant_message(content: str, calls: list[ToolCall]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content or None}
    if calls:
        message["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                # the template renders arguments; a dict renders as JSON, as the model wrote it
                "function": {"name": c.name, "arguments": _as_dict(c.arguments)},
            }
            for c in calls
        ]
    return message


def _as_dict(arguments) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments
