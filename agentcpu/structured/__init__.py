"""Constrained decoding: JSON answers and tool calls that are valid by construction.

`build_constraint(...)` turns a request's `response_format` / `tools` / `tool_choice` into
a `TokenConstraint` for the engine (or None when the output is free). Grammars are
compiled with llguidance (chosen by measurement: docs/structured-decoding.md), once per
grammar, against the tokenizer's llguidance view, built once per tokenizer.
"""

from __future__ import annotations

from typing import Any

from agentcpu.engine.constraint import TokenConstraint
from agentcpu.errors import InvalidRequestError
from agentcpu.structured import grammar
from agentcpu.structured.compiler import GrammarCompiler, compiler_for
from agentcpu.structured.constraint import GrammarConstraint, bitmask_to_bool
from agentcpu.structured.schema import AUTO, NONE, response_schema, tool_mode, tool_specs
from agentcpu.tokenizer.tokenizer import Tokenizer

__all__ = ["GrammarCompiler", "GrammarConstraint", "bitmask_to_bool", "build_constraint"]


def build_constraint(
    tokenizer: Tokenizer,
    vocab_size: int,
    *,
    response_format: dict | None,
    tools: list[dict] | None,
    tool_choice: Any,
    tool_format: str | None,
) -> TokenConstraint | None:
    """The constraint for one request's output, or None when it is free text.

    - `response_format` json_object / json_schema: the answer is JSON (matching the schema);
    - `tool_choice` "required": only tool calls in `tool_format`, each tool's arguments
      matching its parameters schema; a named function: exactly one call of it;
    - "auto" with tools: free text (or the JSON answer) until the format's trigger, then
      constrained calls; "none" or no tools: tools play no part.
    EOS is allowed only where the grammar is complete; ids past the tokenizer's vocabulary
    never. Raises InvalidRequestError for an invalid schema or tool_choice.
    """
    schema, strict = response_schema(response_format)
    mode, specs = tool_mode(tool_choice, tool_specs(tools or []))
    if mode != NONE and tool_format is None:
        if mode != AUTO:
            raise InvalidRequestError(
                "this model's chat template has no known tool-call format, so calls cannot be forced"
            )
        mode = NONE  # calls could not be parsed: leave tools out of the grammar
    if mode == NONE and schema is None:
        return None
    compiler = compiler_for(tokenizer, vocab_size)
    if mode == NONE:
        text = grammar.json_grammar(schema, lenient=not strict)
    else:
        text = grammar.tool_grammar(tool_format, mode, specs, compiler.delimiter, schema, strict)
    return GrammarConstraint(compiler.matcher(text), compiler.n_vocab, compiler.mask_executor)
