"""One chat choice's output: text deltas through the tool-call parser, as OpenAI deltas.

Streaming sends what `ToolCallParser.feed` yields as it comes; at the end the parser's
final result is compared with what was sent and any difference (held-back text, the
tail of an arguments string) goes out in the last chunk, so the deltas always
reassemble to exactly the non-streamed answer.
"""

from __future__ import annotations

import logging

from agentcpu.engine.outputs import RequestOutput

log = logging.getLogger(__name__)


def finish_reason(engine_reason: str | None, made_tool_calls: bool) -> str | None:
    if made_tool_calls and engine_reason == "stop":
        return "tool_calls"
    return engine_reason


def tool_call_json(call) -> dict:
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


class ChatChoiceOutput:
    """`parser` None: all text is content. `parallel_tool_calls` False keeps the first call.

    The EOS / stop token that ends an output never reaches its text (the engine leaves
    it out), also when special tokens are kept for a tool format.
    """

    def __init__(self, parser, parallel_tool_calls: bool = True):
        self.parser = parser
        self.max_calls = None if parallel_tool_calls else 1
        self.content_sent = ""
        self.calls_sent: dict[int, str] = {}  # index -> arguments sent so far
        self.made_tool_calls = False
        self._call_names: dict[int, dict] = {}  # index -> {"id", "name"} as they appear

    @property
    def issued_calls(self) -> list[dict]:
        """The tool calls this output made, as `{"id", "function": {"name"}}` (for
        learning how long the client takes to run them: `server/tool_pauses.py`)."""
        return [
            {"id": c["id"], "function": {"name": c["name"]}}
            for c in self._call_names.values()
            if c.get("id") and c.get("name")
        ]

    # -- non-streamed ---------------------------------------------------------------

    def complete(self, out: RequestOutput) -> tuple[str | None, list[dict]]:
        """(content, tool_calls) of a whole output."""
        text = out.text
        if self.parser is None:
            return text, []
        if text:
            self.parser.feed(text)
        result = self.parser.finish()
        calls = list(result.tool_calls)[: self.max_calls]
        self.made_tool_calls = bool(calls)
        content = result.content if calls else result.content or ""  # null only beside calls
        for index, call in enumerate(calls):
            self._call_names[index] = {"id": call.id, "name": call.name}
        return content, [tool_call_json(c) for c in calls]

    # -- streamed -------------------------------------------------------------------

    def delta(self, out: RequestOutput) -> dict:
        """The OpenAI `delta` for this output (empty when there is nothing new)."""
        text = out.delta_text
        if self.parser is None:
            return {"content": text} if text else {}
        content, calls = "", []
        if text:
            parsed = self.parser.feed(text)
            content = parsed.content or ""
            calls = [self._call_delta(d) for d in parsed.tool_calls if self._wanted(d.index)]
        self.content_sent += content
        if out.finished:
            more_content, more_calls = self._reconcile(self.parser.finish())
            content += more_content
            calls += more_calls
        delta: dict = {}
        if content:
            delta["content"] = content
        if calls:
            delta["tool_calls"] = calls
        return delta

    def _wanted(self, index: int) -> bool:
        return self.max_calls is None or index < self.max_calls

    def _call_delta(self, d) -> dict:
        entry: dict = {"index": d.index}
        function: dict = {}
        if d.index not in self.calls_sent:
            self.calls_sent[d.index] = ""
            self.made_tool_calls = True
        names = self._call_names.setdefault(d.index, {})
        if d.id is not None:
            entry.update(id=d.id, type="function")
            names["id"] = d.id
        if d.name is not None:
            names["name"] = d.name
            function.update(name=d.name, arguments="")  # as OpenAI: clients append to ""
        if d.arguments_delta:
            function["arguments"] = d.arguments_delta
            self.calls_sent[d.index] += d.arguments_delta
        entry["function"] = function
        return entry

    def _reconcile(self, result) -> tuple[str, list[dict]]:
        """What the final parse holds beyond the deltas already sent."""
        content = result.content or ""
        extra_content = ""
        if content.startswith(self.content_sent):
            extra_content = content[len(self.content_sent) :]
        else:
            log.warning("streamed content diverged from the final parse; keeping what was sent")
        extra_calls = []
        for index, call in enumerate(list(result.tool_calls)[: self.max_calls]):
            self.made_tool_calls = True
            sent = self.calls_sent.get(index)
            if sent is None:
                extra_calls.append({"index": index, **tool_call_json(call)})
                self._call_names[index] = {"id": call.id, "name": call.name}
            elif call.arguments != sent:
                if call.arguments.startswith(sent):
                    tail = call.arguments[len(sent) :]
                    extra_calls.append({"index": index, "function": {"arguments": tail}})
                else:
                    log.warning("streamed tool-call arguments diverged from the final parse")
        return extra_content, extra_calls
