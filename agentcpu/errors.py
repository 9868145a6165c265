"""Typed errors raised at agentcpu's seams.

Every error a user can cause derives from `AgentCPUError`; the server maps these classes
to HTTP status codes in one place (`server/errors.py`), the CLI prints their message.
"""


class AgentCPUError(Exception):
    """Base class of all errors agentcpu raises on purpose."""


class ModelLoadError(AgentCPUError):
    """A model directory or file cannot be loaded (missing file, bad tensor, bad shape)."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint's architecture / model_type is not one agentcpu implements."""


class InvalidRequestError(AgentCPUError, ValueError):
    """A request or parameter is malformed (empty prompt, max_tokens < 1, ...)."""


class ContextLengthError(InvalidRequestError):
    """The prompt plus requested output does not fit the model's context."""

    def __init__(self, prompt_tokens: int, max_tokens: int, max_model_len: int):
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.max_model_len = max_model_len
        super().__init__(
            f"prompt has {prompt_tokens} tokens and {max_tokens} output tokens were requested, "
            f"but the model's context is {max_model_len} tokens"
        )


class CapacityError(AgentCPUError):
    """The request can never fit the KV cache, or the queue is full."""


class ChatTemplateError(InvalidRequestError):
    """The model has no chat template, or its template rejected the conversation."""
