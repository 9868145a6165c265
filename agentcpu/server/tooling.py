"""The server's seam to tool-call parsing (`tools.parsers`) and constrained decoding
(`structured`): imported on first use, so the HTTP layer loads without them, and a
request that needs them gets a 400 naming the missing feature rather than a 500.
"""

from __future__ import annotations

import logging
from typing import Any

from agentcpu.errors import AgentCPUError
from agentcpu.server.errors import FieldError

log = logging.getLogger(__name__)


def detect_tool_format(chat_template: str | None) -> str | None:
    """ "hermes" | "llama3_json" | "mistral" | None, read from the chat template."""
    try:
        from agentcpu.tools.parsers import detect_tool_format as detect
    except ImportError:
        log.warning("agentcpu.tools.parsers is unavailable: tool calls will not be parsed")
        return None
    return detect(chat_template)


def make_tool_parser(tool_format: str, tools: list[dict] | None):
    """A fresh `ToolCallParser` (one per choice: it holds the parse state)."""
    from agentcpu.tools.parsers import ToolCallParser

    return ToolCallParser(tool_format, tools)


def make_constraint(
    tokenizer: Any,
    vocab_size: int,
    *,
    response_format: dict | None,
    tools: list[dict] | None,
    tool_choice: str | dict | None,
    tool_format: str | None,
):
    """A fresh `TokenConstraint` for one choice, or None when output is unconstrained.

    Schemas are client input: whatever they make the compiler raise is a 400.
    """
    param = "response_format" if response_format is not None else "tools"
    try:
        from agentcpu.structured import build_constraint
    except ImportError:
        raise FieldError(param, "constrained decoding is not available in this build") from None
    try:
        return build_constraint(
            tokenizer,
            vocab_size,
            response_format=response_format,
            tools=tools,
            tool_choice=tool_choice,
            tool_format=tool_format,
        )
    except AgentCPUError:
        raise
    except Exception as e:  # a schema the grammar compiler chokes on is still the client's
        log.warning("constraint compilation failed", exc_info=True)
        raise FieldError(param, f"the schema could not be compiled: {e}") from e
