"""Tool calls out of model text, streamed as OpenAI deltas.

A family writes calls in its own format (`TOOL_FORMATS`):

- "hermes" (Qwen2.5, Hermes): text, then `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`
  blocks;
- "llama3_json" (Llama 3.x): the whole output is `{"name": ..., "parameters": {...}}` (several
  joined by `;`), optionally after `<|python_tag|>`; output not starting so is text;
- "mistral": text, then `[TOOL_CALLS]` and a JSON list of `{"name": ..., "arguments": {...}}`.

`ToolCallParser.feed(delta)` returns what is certain so far: content text (text that may
be the start of a trigger is held back) and tool-call deltas (the first one of a call
carries its id and name, later ones fragments of its arguments, raw as generated).
`flush()` returns what was held back at the end; `finish()` the whole result. The deltas
from `feed` and `flush` concatenate to exactly `finish()`. Pass text decoded with the
trigger kept: `[TOOL_CALLS]` and `<|python_tag|>` are special tokens that
`skip_special_tokens` drops.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field

from agentcpu.errors import InvalidRequestError

HERMES, LLAMA3_JSON, MISTRAL = "hermes", "llama3_json", "mistral"
TOOL_FORMATS = (HERMES, LLAMA3_JSON, MISTRAL)

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
MISTRAL_TRIGGER = "[TOOL_CALLS]"
LLAMA3_PYTHON_TAG = "<|python_tag|>"
ARGUMENT_KEYS = ("arguments", "parameters")
CALL_ID_HEX_BYTES = 12
_WHITESPACE = " \t\r\n"


# formats whose markers are special tokens in their model families' tokenizers; Hermes'
# <tool_call> is plain text in Qwen2.5's tokenizer but special in others (the demo model's)
TRIGGERED_BY_SPECIAL_TOKEN = ("mistral", "llama3_json")


def tool_markers_are_special(tokenizer, tool_format: str | None) -> bool:
    """Whether the format's tool-call markers are special tokens, which decoding would
    otherwise drop before the parser sees them."""
    if tool_format in TRIGGERED_BY_SPECIAL_TOKEN:
        return True
    token_id = tokenizer.token_to_id(HERMES_OPEN) if tool_format == "hermes" else None
    return token_id is not None and token_id in tokenizer.special_token_ids


def detect_tool_format(chat_template: str | None) -> str | None:
    """The tool-call format a chat template teaches its model, or None if it has none."""
    if not chat_template:
        return None
    if HERMES_OPEN in chat_template:
        return HERMES
    if MISTRAL_TRIGGER in chat_template:
        return MISTRAL
    if LLAMA3_PYTHON_TAG in chat_template or '"parameters"' in chat_template:
        return LLAMA3_JSON
    return None


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text


@dataclass
class ToolCallDelta:
    index: int
    id: str | None = None
    name: str | None = None
    arguments_delta: str = ""


@dataclass
class ParsedDelta:
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


@dataclass
class ParsedResult:
    content: str | None
    tool_calls: list[ToolCall]


def new_call_id() -> str:
    return f"call_{secrets.token_hex(CALL_ID_HEX_BYTES)}"


class _CallObject:
    """One tool-call JSON object, scanned a character at a time as it arrives.

    Finds the name and the arguments value; `done` once the object's closing brace is
    read. Values are located, not parsed, so an object / array of arguments streams as
    its characters arrive (`take_arguments`); a string (stringified JSON) or scalar comes
    out whole once complete. Work and memory stay linear in the object's length.
    """

    def __init__(self):
        self.raw: list[str] = []  # the text consumed, in chunks
        self.name: str | None = None
        self.done = False
        self.broken = False
        self.index: int | None = None  # position in the call list once named
        self.seen_arguments = False
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._expect = "open"  # open | key | colon | value | comma
        self._key: str | None = None
        self._token: list[str] | None = None  # a depth-1 key, string or scalar being read
        self._value_is_arguments = False
        self._streaming = False  # inside an object / array arguments value
        self._arguments: list[str] = []  # arguments text not yet taken

    def feed(self, text: str) -> int:
        """Consume characters until the object closes; returns how many were used."""
        used = len(text)
        for i, ch in enumerate(text):
            self._step(ch)
            if self.done or self.broken:
                used = i + 1
                break
        self.raw.append(text[:used])
        return used

    def take_arguments(self) -> str:
        """Arguments text that became certain since the last call."""
        taken, self._arguments = "".join(self._arguments), []
        return taken

    def _step(self, ch: str) -> None:
        if self._streaming:
            self._arguments.append(ch)
        if self._in_string:
            self._string_char(ch)
        elif self._depth > 1:
            self._nested_char(ch)
        else:
            self._top_char(ch)

    def _string_char(self, ch: str) -> None:
        if self._token is not None:
            self._token.append(ch)
        if self._escape:
            self._escape = False
        elif ch == "\\":
            self._escape = True
        elif ch == '"':
            self._in_string = False
            if self._depth == 1:
                self._token_done()

    def _nested_char(self, ch: str) -> None:
        if ch == '"':
            self._in_string = True
        elif ch in "{[":
            self._depth += 1
        elif ch in "}]":
            self._depth -= 1
            if self._depth == 1:
                self._value_done(None)

    def _top_char(self, ch: str) -> None:
        if self._token is not None:  # a number / true / false / null ends at a delimiter
            if ch not in _WHITESPACE and ch not in ",}":
                self._token.append(ch)
                return
            self._token_done()
        if ch in _WHITESPACE:
            return
        expect = self._expect
        if expect == "open" and ch == "{":
            self._depth, self._expect = 1, "key"
        elif expect == "key" and ch == '"':
            self._in_string, self._token = True, [ch]
        elif expect == "colon" and ch == ":":
            self._expect = "value"
        elif expect == "value":
            self._value_begins(ch)
        elif expect == "comma" and ch == ",":
            self._expect = "key"
        elif expect in ("key", "comma") and ch == "}":
            self._depth, self.done = 0, True
        else:
            self.broken = True

    def _value_begins(self, ch: str) -> None:
        self._value_is_arguments = self._key in ARGUMENT_KEYS and not self.seen_arguments
        self.seen_arguments |= self._value_is_arguments
        if ch in "{[":
            self._depth += 1
            if self._value_is_arguments:
                self._streaming = True
                self._arguments.append(ch)
        else:
            self._token, self._in_string = [ch], ch == '"'

    def _token_done(self) -> None:
        text, self._token = "".join(self._token or []), None
        if self._expect == "key":
            key = _loads(text)
            self._key = key if isinstance(key, str) else None
            self._expect = "colon"
        else:
            self._value_done(text)

    def _value_done(self, text: str | None) -> None:
        """End of the current value; `text` is the value when it is a string or scalar."""
        if self._value_is_arguments and text is not None:
            decoded = _loads(text)
            self._arguments.append(decoded if isinstance(decoded, str) else text)
        elif self._key == "name" and text is not None and self.name is None:
            name = _loads(text)
            self.name = name if isinstance(name, str) else None
        self._streaming = self._value_is_arguments = False
        self._expect = "comma"


def _loads(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


class _Calls:
    """The calls found so far and the deltas owed for them."""

    def __init__(self):
        self.calls: list[ToolCall] = []  # arguments are filled in by `results`
        self._arguments: list[list[str]] = []

    def update(self, obj: _CallObject, out: list[ToolCallDelta]) -> None:
        if obj.name is None:
            return  # arguments wait in `obj` until the call has a name
        if obj.index is None:
            obj.index = len(self.calls)
            self.calls.append(ToolCall(new_call_id(), obj.name, ""))
            self._arguments.append([])
            out.append(ToolCallDelta(obj.index, self.calls[obj.index].id, obj.name))
        fragment = obj.take_arguments()
        if obj.done and not obj.seen_arguments:
            fragment += "{}"
        if fragment:
            self._arguments[obj.index].append(fragment)
            _append_fragment(out, obj.index, fragment)

    def results(self) -> list[ToolCall]:
        return [
            ToolCall(c.id, c.name, "".join(a))
            for c, a in zip(self.calls, self._arguments, strict=True)
        ]


def _append_fragment(out: list[ToolCallDelta], index: int, fragment: str) -> None:
    if out and out[-1].index == index:
        out[-1].arguments_delta += fragment
    else:
        out.append(ToolCallDelta(index, arguments_delta=fragment))


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that begins `marker` (so might become it)."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ToolCallParser:
    """Splits one model output into content and tool calls, as it streams.

    `format` is one of TOOL_FORMATS; `tools` (OpenAI tool dicts) are the request's tools
    (calls to other names are still reported: constrained decoding prevents them).
    """

    def __init__(self, format: str, tools: list[dict] | None = None):
        if format not in TOOL_FORMATS:
            raise InvalidRequestError(f"unknown tool-call format {format!r}; known: {TOOL_FORMATS}")
        self.format = format
        self.tool_names = [_tool_name(t) for t in tools or []]
        self._pending = ""  # text received but not yet consumed
        self._content: list[str] = []
        self._calls = _Calls()
        self._obj: _CallObject | None = None
        self._state = "start" if format == LLAMA3_JSON else "text"
        self._finished = False

    # -- public -------------------------------------------------------------------------

    def feed(self, delta_text: str) -> ParsedDelta:
        if self._finished:
            raise InvalidRequestError("feed() after finish(): this parser's output is complete")
        self._pending += delta_text
        return self._run(final=False)

    def flush(self) -> ParsedDelta:
        """Everything still held back, now that no more text will come."""
        if self._finished:
            return ParsedDelta()
        self._finished = True
        return self._run(final=True)

    def finish(self) -> ParsedResult:
        self.flush()
        return ParsedResult("".join(self._content) or None, self._calls.results())

    # -- the state machine ----------------------------------------------------------------
    # States: start (llama3_json: decide text or calls), text (look for the trigger),
    # list (mistral: the `[`), open (hermes: the object), calls (inside a call object or
    # between objects), separator (after an object), gap (whitespace after a block),
    # rest (plain content to the end).

    def _run(self, final: bool) -> ParsedDelta:
        out = ParsedDelta()
        while True:
            before = (self._state, self._pending, self._obj)
            getattr(self, f"_in_{self._state}")(out, final)
            if (self._state, self._pending, self._obj) == before:
                break
        if final:
            self._give_up(out)
        return out

    def _emit(self, out: ParsedDelta, text: str) -> None:
        if text:
            out.content += text
            self._content.append(text)

    def _in_start(self, out: ParsedDelta, final: bool) -> None:
        text = self._pending
        if text.startswith(LLAMA3_PYTHON_TAG):
            self._pending, self._state = text[len(LLAMA3_PYTHON_TAG) :], "calls"
        elif text.startswith("{"):
            self._state = "calls"
        elif text and (final or not LLAMA3_PYTHON_TAG.startswith(text)):
            self._state = "rest"

    def _in_rest(self, out: ParsedDelta, final: bool) -> None:
        self._emit(out, self._pending)
        self._pending = ""

    def _in_text(self, out: ParsedDelta, final: bool) -> None:
        trigger = HERMES_OPEN if self.format == HERMES else MISTRAL_TRIGGER
        text = self._pending
        at = text.find(trigger)
        if at >= 0:
            self._emit(out, text[:at].rstrip(_WHITESPACE))
            self._pending = text[at + len(trigger) :]
            self._state = "open" if self.format == HERMES else "list"
            return
        keep = 0 if final else _held_back(text, trigger)
        self._emit(out, text[: len(text) - keep])
        self._pending = text[len(text) - keep :]

    def _in_gap(self, out: ParsedDelta, final: bool) -> None:
        self._pending = self._pending.lstrip(_WHITESPACE)
        if self._pending:
            self._state = "text"

    def _in_list(self, out: ParsedDelta, final: bool) -> None:
        text = self._pending.lstrip(_WHITESPACE)
        if text.startswith("["):
            self._pending, self._state = text[1:], "calls"
        elif text:
            self._emit(out, MISTRAL_TRIGGER)
            self._pending, self._state = text, "text"

    def _in_open(self, out: ParsedDelta, final: bool) -> None:
        text = self._pending.lstrip(_WHITESPACE)
        if text.startswith("{"):
            self._pending, self._state = text, "calls"
        elif text:
            self._emit(out, HERMES_OPEN)
            self._pending, self._state = text, "text"

    def _in_calls(self, out: ParsedDelta, final: bool) -> None:
        if self._obj is None:
            text = self._pending.lstrip(_WHITESPACE)
            if not text.startswith("{"):
                self._pending, self._state = text, ("rest" if text else "calls")
                return
            self._pending, self._obj = text, _CallObject()
        used = self._obj.feed(self._pending)
        self._pending = self._pending[used:]
        self._calls.update(self._obj, out.tool_calls)
        if self._obj.done or self._obj.broken:
            self._close_call(out)

    def _close_call(self, out: ParsedDelta) -> None:
        obj, self._obj = self._obj, None
        if obj.done and obj.index is not None:
            self._state = "separator"
            return
        if obj.index is None:
            self._emit(out, "".join(obj.raw))  # not a call after all
        self._state = "text" if self.format == HERMES else "rest"

    def _in_separator(self, out: ParsedDelta, final: bool) -> None:
        text = self._pending.lstrip(_WHITESPACE)
        self._pending = text
        sep = {HERMES: HERMES_CLOSE, LLAMA3_JSON: ";", MISTRAL: ","}[self.format]
        if text.startswith(sep):
            self._pending = text[len(sep) :]
            self._state = "gap" if self.format == HERMES else "calls"
        elif self.format == MISTRAL and text.startswith("]"):
            self._pending, self._state = text[1:], "gap"
        elif text and (final or not sep.startswith(text)):
            self._state = "text" if self.format == HERMES else "rest"

    def _give_up(self, out: ParsedDelta) -> None:
        """At the end: an unfinished object without a name was text after all."""
        if self._obj is not None and self._obj.name is None:
            self._emit(out, "".join(self._obj.raw))
        self._obj = None
        if self._state in ("gap", "separator", "calls", "open", "list"):
            self._pending = ""  # whitespace, or the tail of a cut-off call
        self._emit(out, self._pending)
        self._pending = ""


def _held_back(text: str, trigger: str) -> int:
    """How much of the end of `text` to hold: a possible start of the trigger and the
    whitespace before it (dropped if the trigger follows)."""
    partial = _partial_suffix(text, trigger)
    before = text[: len(text) - partial]
    return partial + len(before) - len(before.rstrip(_WHITESPACE))


def _tool_name(tool: dict) -> str | None:
    function = tool.get("function", tool) if isinstance(tool, dict) else None
    return function.get("name") if isinstance(function, dict) else None
