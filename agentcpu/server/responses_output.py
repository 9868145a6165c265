"""One response's output items, built from the engine's outputs through the chat
tool-call parser (`ChatChoiceOutput`), with the stream events that build them.

Streamed and whole answers go through the same `feed`, so their items are identical by
construction: a message item opens at the first text (or the first text after a call),
a function_call item at each new call, in order of appearance; all items close ("done"
events, final status) when the output ends, so a tail the parser releases only at the
end still lands in its own item. Events are plain dicts holding snapshots of the items;
the caller numbers them (`sequence_number`).
"""

from __future__ import annotations

import copy
import uuid

from agentcpu.engine.outputs import RequestOutput
from agentcpu.server.chat_output import ChatChoiceOutput


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponseOutput:
    def __init__(self, chat_output: ChatChoiceOutput):
        self.chat = chat_output
        self.items: list[dict] = []
        self._calls: dict[int, dict] = {}  # the parser's call index -> its item

    def feed(self, out: RequestOutput) -> list[dict]:
        """The events for what `out` adds (none when nothing is new)."""
        delta = self.chat.delta(out)
        events = self._text(delta["content"]) if delta.get("content") else []
        for call in delta.get("tool_calls", ()):
            events += self._call(call)
        return events

    def finish(self, status: str) -> list[dict]:
        """Close every item with `status` ("completed" / "incomplete"): the done events.
        An output with nothing in it still answers with one (empty) message."""
        events = [] if self.items else self._open_message()
        for index, item in enumerate(self.items):
            item["status"] = status
            where = {"item_id": item["id"], "output_index": index}
            if item["type"] == "message":
                part = item["content"][0]
                text, part = part["text"], copy.deepcopy(part)
                events.append(
                    _event("output_text.done", **where, content_index=0, text=text, logprobs=[])
                )
                events.append(_event("content_part.done", **where, content_index=0, part=part))
            else:
                arguments = item["arguments"]
                events.append(_event("function_call_arguments.done", **where, arguments=arguments))
            events.append(self._item_event("output_item.done", index))
        return events

    # ---- items --------------------------------------------------------------------

    def _text(self, text: str) -> list[dict]:
        events = []
        if not self.items or self.items[-1]["type"] != "message":
            events += self._open_message()
        index = len(self.items) - 1
        item = self.items[index]
        item["content"][0]["text"] += text
        where = {"item_id": item["id"], "output_index": index, "content_index": 0}
        events.append(_event("output_text.delta", **where, delta=text, logprobs=[]))
        return events

    def _open_message(self) -> list[dict]:
        item = {
            "id": new_id("msg"),
            "type": "message",
            "role": "assistant",
            "status": "in_progress",
            "content": [],
        }
        added = self._add(item)
        part = {"type": "output_text", "text": "", "annotations": []}
        item["content"].append(part)
        where = {"item_id": item["id"], "output_index": len(self.items) - 1}
        part_added = _event("content_part.added", **where, content_index=0, part=dict(part))
        return [added, part_added]

    def _call(self, delta: dict) -> list[dict]:
        events = []
        function = delta.get("function") or {}
        item = self._calls.get(delta["index"])
        if item is None:
            item = {
                "id": new_id("fc"),
                "type": "function_call",
                "status": "in_progress",
                "call_id": delta.get("id") or new_id("call"),
                "name": function.get("name") or "",
                "arguments": "",
            }
            self._calls[delta["index"]] = item
            events.append(self._add(item))
        arguments = function.get("arguments") or ""
        if arguments:
            item["arguments"] += arguments
            where = {"item_id": item["id"], "output_index": self.items.index(item)}
            events.append(_event("function_call_arguments.delta", **where, delta=arguments))
        return events

    def _add(self, item: dict) -> dict:
        self.items.append(item)
        return self._item_event("output_item.added", len(self.items) - 1)

    def _item_event(self, kind: str, index: int) -> dict:
        return _event(kind, output_index=index, item=copy.deepcopy(self.items[index]))


def _event(kind: str, **fields) -> dict:
    return {"type": f"response.{kind}", **fields}
