"""The request body of `POST /v1/responses` (OpenAI's Responses API, the subset served).

Input items are a tagged union on `type` (a message may leave it out). The tags are
hyphenated so the error handler drops them from field paths ("input.1.call_id", not
"input.1.function-call.call_id"); an unknown type gets one message listing the known.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag

from agentcpu.server.protocol import (
    MAX_TOP_LOGPROBS,
    TOOL_NAME_PATTERN,
    NamedFunction,
    Seed,
    _Model,
)

MAX_METADATA_KEYS = 16
MAX_METADATA_KEY_CHARS, MAX_METADATA_VALUE_CHARS = 64, 512
ITEM_TYPES = ("message", "function_call", "function_call_output")


# ---- input items ------------------------------------------------------------------------


class InputText(_Model):
    type: Literal["input_text", "output_text"]
    text: str


MessageContent = str | list[InputText]


class MessageItem(_Model):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: MessageContent


class FunctionCallItem(_Model):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(pattern=TOOL_NAME_PATTERN)
    arguments: str = Field(description="the arguments as a JSON object, encoded as a string")


class FunctionCallOutputItem(_Model):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: MessageContent


def _item_tag(value: Any) -> str | None:
    kind = value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", None)
    return f"item-{kind.replace('_', '-')}" if kind in ITEM_TYPES else None


InputItem = Annotated[
    Annotated[MessageItem, Tag("item-message")]
    | Annotated[FunctionCallItem, Tag("item-function-call")]
    | Annotated[FunctionCallOutputItem, Tag("item-function-call-output")],
    Discriminator(
        _item_tag,
        custom_error_type="invalid_input_item",
        custom_error_message=f"an input item's type must be one of {', '.join(ITEM_TYPES)}",
    ),
]


# ---- tools and formats ------------------------------------------------------------------


class FunctionTool(_Model):
    type: Literal["function"]
    name: str = Field(pattern=TOOL_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(
        default=None, description="JSON schema of the arguments object"
    )
    strict: bool | None = None


class FunctionToolChoice(NamedFunction):
    type: Literal["function"]


ResponsesToolChoice = Literal["none", "auto", "required"] | FunctionToolChoice


class TextFormatText(_Model):
    type: Literal["text"]


class TextFormatJSONObject(_Model):
    type: Literal["json_object"]


class TextFormatJSONSchema(_Model):
    type: Literal["json_schema"]
    name: str = Field(pattern=TOOL_NAME_PATTERN)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


TextFormat = Annotated[
    TextFormatText | TextFormatJSONObject | TextFormatJSONSchema, Field(discriminator="type")
]


class TextConfig(_Model):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


# ---- the request ------------------------------------------------------------------------


class ResponsesRequest(_Model):
    model: str | None = Field(default=None, description="a served model name; omitted: the default")
    input: Annotated[str, Field(min_length=1)] | list[InputItem] = Field(
        description="a user message, or a list of messages, function calls and their outputs"
    )
    instructions: str | None = Field(
        default=None, description="a system message for this turn only (not inherited)"
    )
    previous_response_id: str | None = Field(default=None, max_length=256)
    store: bool = True
    tools: list[FunctionTool] | None = None
    tool_choice: ResponsesToolChoice | None = None
    parallel_tool_calls: bool = True
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stream: bool = False
    user: str | None = None
    metadata: (
        Annotated[
            dict[
                Annotated[str, Field(max_length=MAX_METADATA_KEY_CHARS)],
                Annotated[str, Field(max_length=MAX_METADATA_VALUE_CHARS)],
            ],
            Field(max_length=MAX_METADATA_KEYS),
        ]
        | None
    ) = None
    text: TextConfig | None = None
    truncation: Literal["auto", "disabled"] | None = Field(
        default=None, description="only 'disabled': a conversation too long is a 400"
    )
    background: bool | None = Field(default=None, description="not supported")
    top_logprobs: int | None = Field(
        default=None, ge=0, le=MAX_TOP_LOGPROBS, description="not supported"
    )
    # extras, as on chat completions
    seed: Seed | None = None
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    min_tokens: int = Field(default=0, ge=0)
    ignore_eos: bool = False
