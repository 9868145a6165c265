"""Chat templates: render a conversation to a prompt exactly as transformers does.

Hub templates are untrusted code, so they run in jinja2's immutable sandbox and only see
plain JSON-like data. The environment (trim_blocks, lstrip_blocks, loopcontrols, the
`tojson` / `raise_exception` / `strftime_now` / `dict` / `namespace` helpers and the
`{% generation %}` tag) mirrors transformers' `_compile_jinja_template`, and the variables
mirror its `apply_chat_template(..., tokenize=False)`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from agentcpu.errors import ChatTemplateError

DEFAULT_TEMPLATE_NAME = "default"
TOOL_USE_TEMPLATE_NAME = "tool_use"
# Names a message's reasoning may come under; templates read the first (and gpt-oss "thinking").
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # jinja's own tojson escapes HTML characters; templates expect plain json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` for templates without exposing the `dict` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja's `namespace` that refuses underscore names (no reaching CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805  (same trick as jinja)
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot set underscore-prefixed namespace attributes ({name!r})"
            )


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks;
    rendering a prompt only needs the body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(
            lineno
        )

    def _render_body(self, caller: Any) -> str:
        return caller()


def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in a sandboxed environment configured like transformers'."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not compile: {e}") from e


def plain_template_data(value: Any) -> Any:
    """Rebuild `value` from JSON types only; anything else becomes an inert "<TypeName>".

    The sandbox cannot know which methods of rich objects are dangerous, so templates never
    see them. Pydantic models and dataclasses are turned into dicts.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain_template_data(k): plain_template_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_template_data(item) for item in value]
    if isinstance(value, tuple):
        return tuple(plain_template_data(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = dataclasses.fields(value)
        return {f.name: plain_template_data(getattr(value, f.name)) for f in fields}
    if callable(getattr(value, "model_dump", None)):
        return plain_template_data(value.model_dump())
    return f"<{type(value).__name__}>"


def _alias_reasoning(message: dict) -> dict:
    reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def prepare_messages(messages: Any) -> list[dict]:
    """Validate a conversation and turn it into what templates expect.

    Keys whose value is None are dropped (OpenAI clients send `content=None` next to
    `tool_calls`; templates handle a missing key but would print "None").
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatTemplateError("messages must be a non-empty list of message objects")
    prepared = []
    for message in plain_template_data(list(messages)):
        if not isinstance(message, dict):
            raise ChatTemplateError(f"each message must be an object, got {message!r}")
        prepared.append(_alias_reasoning({k: v for k, v in message.items() if v is not None}))
    return prepared


def prepare_tools(tools: Any) -> list[dict] | None:
    if tools is None:
        return None
    if not isinstance(tools, (list, tuple)):
        raise ChatTemplateError("tools must be a list of JSON schemas")
    prepared = plain_template_data(list(tools))
    for tool in prepared:
        if not isinstance(tool, dict):
            raise ChatTemplateError(f"each tool must be a JSON schema object, got {tool!r}")
    return prepared


class ChatTemplates:
    """A model's named chat templates, each compiled on first use and then reused."""

    def __init__(self, templates: Mapping[str, str]):
        self.sources = dict(templates)
        self._compiled: dict[str, jinja2.Template] = {}

    @classmethod
    def from_config_value(cls, value: Any) -> ChatTemplates:
        """From tokenizer_config's `chat_template`: a string, a list of {name, template},
        a {name: template} dict, or None."""
        if value is None:
            return cls({})
        if isinstance(value, str):
            return cls({DEFAULT_TEMPLATE_NAME: value})
        if isinstance(value, Mapping):
            return cls({str(k): str(v) for k, v in value.items()})
        if isinstance(value, list) and all(
            isinstance(t, Mapping) and "name" in t and "template" in t for t in value
        ):
            return cls({str(t["name"]): str(t["template"]) for t in value})
        raise ChatTemplateError(
            "chat_template must be a string or a list of {name, template} objects"
        )

    @property
    def default(self) -> str | None:
        return self.sources.get(DEFAULT_TEMPLATE_NAME)

    def select(self, tools: list | None) -> str:
        """The template to use: "tool_use" when tools are given and the model has one,
        else "default" (transformers' `get_chat_template` rule)."""
        if tools is not None and TOOL_USE_TEMPLATE_NAME in self.sources:
            return TOOL_USE_TEMPLATE_NAME
        if DEFAULT_TEMPLATE_NAME in self.sources:
            return DEFAULT_TEMPLATE_NAME
        if not self.sources:
            raise ChatTemplateError(
                "this model has no chat template (no chat_template in tokenizer_config.json, "
                "no chat_template.jinja); use the completions API or supply a template"
            )
        raise ChatTemplateError(
            "this model has several chat templates and none is named 'default': "
            f"{sorted(self.sources)}"
        )

    def compiled(self, name: str) -> jinja2.Template:
        template = self._compiled.get(name)
        if template is None:
            template = compile_template(self.sources[name])
            self._compiled[name] = template
        return template

    def render(self, name: str, variables: Mapping[str, Any]) -> str:
        template = self.compiled(name)
        try:
            return template.render(**variables)
        except (jinja2.TemplateError, TypeError, ValueError) as e:
            raise ChatTemplateError(f"the chat template failed on this conversation: {e}") from e
