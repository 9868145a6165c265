"""ChatChoiceOutput without a server: deltas always reassemble to the final parse, and a
kept stop token is cut from the text."""

from __future__ import annotations

from dataclasses import dataclass, field

from agentcpu.engine.outputs import RequestOutput
from agentcpu.server.chat_output import ChatChoiceOutput


@dataclass
class _Call:
    id: str
    name: str
    arguments: str


@dataclass
class _CallDelta:
    index: int
    id: str | None = None
    name: str | None = None
    arguments_delta: str = ""


@dataclass
class _Parsed:
    content: str = ""
    tool_calls: list = field(default_factory=list)


class _ScriptedParser:
    """Streams only part of what it finally reports, as a parser holding text back may."""

    def __init__(self, script: list[_Parsed], result: _Parsed):
        self.script, self.result = list(script), result

    def feed(self, text: str) -> _Parsed:
        return self.script.pop(0) if self.script else _Parsed()

    def finish(self) -> _Parsed:
        return self.result


def _out(
    delta: str, finished: bool = False, tokens=(1,), reason=None, stop_reason=None
) -> RequestOutput:
    return RequestOutput(
        "r",
        [0],
        list(tokens),
        "",
        [tokens[-1]],
        delta,
        finished,
        reason if finished else None,
        stop_reason,
    )


def _reassemble(deltas: list[dict]) -> tuple[str, dict[int, dict]]:
    content, calls = "", {}
    for d in deltas:
        content += d.get("content", "")
        for c in d.get("tool_calls", []):
            call = calls.setdefault(c["index"], {"id": None, "name": "", "arguments": ""})
            call["id"] = call["id"] or c.get("id")
            call["name"] += c["function"].get("name", "")
            call["arguments"] += c["function"].get("arguments", "")
    return content, calls


def test_held_back_text_and_argument_tails_are_sent_at_the_end():
    final = _Parsed("Sure: ", [_Call("call_a", "f", '{"x": 12}'), _Call("call_b", "g", "{}")])
    parser = _ScriptedParser(
        [
            _Parsed("Sure"),
            _Parsed("", [_CallDelta(0, "call_a", "f", '{"x"')]),
            _Parsed("", [_CallDelta(0, arguments_delta=": 1")]),
        ],
        final,
    )
    output = ChatChoiceOutput(parser)
    deltas = [
        output.delta(_out("a")),
        output.delta(_out("b")),
        output.delta(_out("c")),
        output.delta(_out("d", finished=True, reason="stop")),
    ]
    content, calls = _reassemble(deltas)
    assert content == "Sure: "
    assert calls == {
        0: {"id": "call_a", "name": "f", "arguments": '{"x": 12}'},
        1: {"id": "call_b", "name": "g", "arguments": "{}"},
    }
    assert output.made_tool_calls
    assert deltas[1]["tool_calls"][0] == {
        "index": 0,
        "id": "call_a",
        "type": "function",
        "function": {"name": "f", "arguments": '{"x"'},
    }


def test_parallel_tool_calls_false_keeps_the_first_call():
    final = _Parsed("", [_Call("a", "f", "{}"), _Call("b", "g", "{}")])
    output = ChatChoiceOutput(_ScriptedParser([], final), parallel_tool_calls=False)
    content, calls = output.complete(_out("x", finished=True, reason="stop"))
    assert [c["function"]["name"] for c in calls] == ["f"]
    _, streamed = _reassemble(
        [ChatChoiceOutput(_ScriptedParser([], final), False).delta(_out("x", True, reason="stop"))]
    )
    assert list(streamed) == [0]


def test_text_without_calls_is_a_string_never_null():
    output = ChatChoiceOutput(_ScriptedParser([], _Parsed(None, [])))
    assert output.complete(_out("", finished=True, reason="stop")) == ("", [])
