"""OpenAI API shapes (requests and non-streamed responses) as pydantic models.

These models are the request bodies FastAPI validates and documents in /openapi.json,
so their bounds are the server's bounds. Unknown fields are ignored, as OpenAI clients
send newer fields freely; fields we cannot honour are declared and refused when set.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_CHOICES = 16  # `n`: each choice is one engine request
MAX_TOP_LOGPROBS = 20  # the sampler's limit
MAX_AGENT_TURNS = 64  # `max_turns` of a server-side agent run
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes
TOOL_NAME_PATTERN = r"^[a-zA-Z0-9_.-]{1,64}$"

Seed = Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)]
Stop = str | list[str]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


# ---- messages -------------------------------------------------------------------------


class TextContentPart(_Model):
    type: Literal["text"]
    text: str


TextContent = str | list[TextContentPart]


class FunctionCall(_Model):
    name: str
    arguments: str = Field(description="the arguments as a JSON object, encoded as a string")


class ToolCall(_Model):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class SystemMessage(_Model):
    role: Literal["system"]
    content: TextContent
    name: str | None = None


class DeveloperMessage(_Model):
    role: Literal["developer"]
    content: TextContent
    name: str | None = None


class UserMessage(_Model):
    role: Literal["user"]
    content: TextContent
    name: str | None = None


class AssistantMessage(_Model):
    role: Literal["assistant"]
    content: TextContent | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    reasoning_content: str | None = None


class ToolMessage(_Model):
    role: Literal["tool"]
    content: TextContent
    tool_call_id: str


ChatMessage = Annotated[
    SystemMessage | DeveloperMessage | UserMessage | AssistantMessage | ToolMessage,
    Field(discriminator="role"),
]


# ---- tools and response formats ------------------------------------------------------


class FunctionDefinition(_Model):
    name: str = Field(pattern=TOOL_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(
        default=None, description="JSON schema of the arguments object"
    )
    strict: bool | None = None


class ChatTool(_Model):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Model):
    name: str


class NamedToolChoice(_Model):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class JSONSchemaFormat(_Model):
    name: str = Field(pattern=TOOL_NAME_PATTERN)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextResponseFormat(_Model):
    type: Literal["text"]


class JSONObjectResponseFormat(_Model):
    type: Literal["json_object"]


class JSONSchemaResponseFormat(_Model):
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


ResponseFormat = Annotated[
    TextResponseFormat | JSONObjectResponseFormat | JSONSchemaResponseFormat,
    Field(discriminator="type"),
]


class StreamOptions(_Model):
    include_usage: bool = False


# ---- requests -------------------------------------------------------------------------


class SamplingFields(_Model):
    """Fields both endpoints share, including vLLM's extras (ignore_eos, min_tokens, top_k)."""

    model: str | None = Field(default=None, description="a served model name; omitted: the default")
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stop: Stop | None = None
    seed: Seed | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = Field(default=None, description="not supported")
    user: str | None = None
    session_id: str | None = Field(
        default=None,
        max_length=256,
        description="agent session: its KV is kept between turns (also: X-Session-Id header, or `user`)",
    )
    # vLLM-style extras
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)
    min_tokens: int = Field(default=0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(
        default=None, ge=1, description="deprecated alias of max_completion_tokens"
    )
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[ChatTool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    constrain_tool_calls: bool = Field(
        default=True,
        description="extension: false leaves tool calls to the model (no grammar; the server "
        "still parses what it writes, and text that does not parse stays content)",
    )
    # extensions: the server runs the agent loop with its own tools (server/agent_run.py)
    server_tools: Literal["all"] | Annotated[list[str], Field(min_length=1)] | None = Field(
        default=None,
        description='extension: tools this server runs itself (names, or "all"); the server '
        "then runs model turn -> tools -> next turn and answers with the final turn",
    )
    max_turns: int | None = Field(
        default=None,
        ge=1,
        le=MAX_AGENT_TURNS,
        description="extension: most model turns of a server_tools run (default: the "
        "server's --max-agent-turns)",
    )


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
CompletionPrompt = (
    Annotated[str, Field(min_length=1)]
    | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
    | TokenIds
    | Annotated[list[TokenIds], Field(min_length=1)]
)


class CompletionRequest(SamplingFields):
    prompt: CompletionPrompt = Field(
        description="a string, a list of strings, a list of token ids, or a list of those"
    )
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = Field(default=None, description="not supported")
    best_of: int | None = Field(default=None, ge=1, le=MAX_CHOICES, description="must equal n")


# ---- responses ------------------------------------------------------------------------


class PromptTokensDetails(_Model):
    cached_tokens: int = 0


class Usage(_Model):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(_Model):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(_Model):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(_Model):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


FinishReason = Literal["stop", "length", "tool_calls", "abort"]


class ChatChoice(_Model):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionResponse(_Model):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(_Model):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_Model):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class CompletionResponse(_Model):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(_Model):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "agentcpu"
    root: str
    max_model_len: int


class ModelList(_Model):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(_Model):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Model):
    error: ErrorInfo


class HealthResponse(_Model):
    status: Literal["ok"] = "ok"
