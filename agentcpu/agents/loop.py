"""The server-side agent loop: model turn -> tool calls -> tools run -> results appended
-> next turn, until a turn makes no tool call or `max_turns` is reached.

Every turn of a run uses the same session id, so the engine pins the session's KV while
its tools run (TTL from the tools' recent latency) and the next turn prefills only the
appended tool results. Tool failures come back to the model as error text, never as an
exception out of the loop.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from agentcpu.engine.async_engine import AsyncEngine
from agentcpu.engine.sampling_params import SamplingParams
from agentcpu.tools.executor import ToolCall, ToolExecutor

MIN_PIN_TTL_S = 5.0
MAX_PIN_TTL_S = 300.0
PIN_TTL_LATENCY_FACTOR = 3.0  # keep KV for a few times the tools' typical latency


@dataclass
class AgentEvent:
    """One thing that happened: "text" (delta), "tool_call", "tool_result", "final"."""

    type: str
    turn: int
    data: dict[str, Any] = field(default_factory=dict)


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
    ):
        self.engine = engine
        self.tokenizer = tokenizer
        self.executor = executor
        self.tool_format = tool_format
        self.constrain = constrain_tool_calls
        self.max_turns = max_turns
        self._ids = itertools.count()

    async def run(
        self,
        messages: list[dict[str, Any]],
        params: SamplingParams,
        session_id: str | None = None,
        run: AgentRun | None = None,
    ) -> AsyncIterator[AgentEvent]:
        """Run the loop on a copy of `messages`; `run` (if given) collects the totals."""
        run = run or AgentRun(messages=[])
        run.messages = list(messages)
        session_id = session_id or f"agent-{uuid.uuid4().hex[:12]}"
        tools = self.executor.registry.schemas()
        for turn in range(self.max_turns):
            run.turns = turn + 1
            reply = {}
            async for event in self._model_turn(run, tools, params, session_id, turn, reply):
                yield event
            run.messages.append(reply["message"])
            if not reply["calls"]:
                run.final_text, run.finish_reason = reply["message"].get("content") or "", "stop"
                yield AgentEvent("final", turn, {"content": run.final_text})
                return
            async for event in self._run_tools(run, reply["calls"], turn):
                yield event
        run.finish_reason = "max_turns"
        yield AgentEvent("final", self.max_turns - 1, {"content": run.final_text, "max_turns": True})

    async def _model_turn(self, run, tools, params, session_id, turn, reply):
        from agentcpu.tools.parsers import ToolCallParser, tool_markers_are_special

        prompt = self.tokenizer.apply_chat_template(run.messages, tools=tools, add_generation_prompt=True)
        prompt_ids = self.tokenizer.encode(prompt)
        parser = ToolCallParser(self.tool_format, tools) if self.tool_format else None
        if tool_markers_are_special(self.tokenizer, self.tool_format):  # keep them visible
            params = dataclasses.replace(params, skip_special_tokens=False)
        out = None
        async for out in self.engine.generate(
            prompt_ids,
            params,
            f"{session_id}-t{turn}-{next(self._ids)}",
            constraint=self._constraint(tools),
            session_id=session_id,
            pin_ttl_s=self._pin_ttl(),
        ):
            text = parser.feed(out.delta_text).content if parser else out.delta_text
            if text:
                yield AgentEvent("text", turn, {"delta": text})
        run.prompt_tokens += len(prompt_ids)
        run.cached_tokens += out.num_cached_tokens
        run.completion_tokens += len(out.token_ids)
        content, calls = (out.text, []) if parser is None else _parsed(parser.finish())
        reply["calls"] = calls
        reply["message"] = _assistant_message(content, calls)

    async def _run_tools(self, run: AgentRun, calls: list[ToolCall], turn: int):
        for call in calls:
            yield AgentEvent("tool_call", turn, {"id": call.id, "name": call.name, "arguments": call.arguments})
        results = await self.executor.run_all(calls)
        for call, result in zip(calls, results, strict=True):
            run.tool_calls += 1
            run.tool_errors += not result.ok
            run.messages.append(
                {"role": "tool", "tool_call_id": call.id, "name": call.name, "content": result.content}
            )
            yield AgentEvent(
                "tool_result",
                turn,
                {"id": call.id, "name": call.name, "ok": result.ok, "content": result.content},
            )

    def _constraint(self, tools):
        if not self.constrain or not tools or not self.tool_format:
            return None
        from agentcpu.structured import build_constraint

        vocab = self.engine.engine.config.model_config.vocab_size
        return build_constraint(
            self.tokenizer, vocab, response_format=None, tools=tools, tool_choice="auto", tool_format=self.tool_format
        )

    def _pin_ttl(self) -> float | None:
        """A few times the slowest recent tool latency, clamped; None: engine default."""
        emas = [self.executor.latency_ema(name) for name in self.executor.registry.names()]
        known = [e for e in emas if e is not None]
        if not known:
            return None
        return min(MAX_PIN_TTL_S, max(MIN_PIN_TTL_S, PIN_TTL_LATENCY_FACTOR * max(known)))


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
