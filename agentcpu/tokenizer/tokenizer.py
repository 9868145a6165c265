"""The model's tokenizer: text <-> ids, special tokens, and the chat template.

Wraps a Hugging Face `tokenizers.Tokenizer` (tokenizer.json) and behaves like
transformers' fast tokenizer built from the same files, without importing transformers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers

from agentcpu.errors import InvalidRequestError, ModelLoadError
from agentcpu.tokenizer import files
from agentcpu.tokenizer.chat_template import (
    ChatTemplates,
    plain_template_data,
    prepare_messages,
    prepare_tools,
)


def _token_content(value: Any) -> str | None:
    """A token as tokenizer_config.json writes it: a string or a serialized AddedToken."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _named_special_tokens(config: Mapping[str, Any]) -> dict[str, str]:
    """Every `*_token` entry: bos_token, eos_token, pad_token, ... and model-specific ones
    (image_token, ...), as transformers passes them to chat templates."""
    named = {}
    for key, value in config.items():
        content = _token_content(value)
        if content is not None and key.endswith("_token"):
            named[key] = content
    extra = config.get("extra_special_tokens")
    if isinstance(extra, Mapping):
        named.update({k: c for k, v in extra.items() if (c := _token_content(v)) is not None})
    return named


def _extra_special_tokens(config: Mapping[str, Any]) -> list[str]:
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    values = extra.values() if isinstance(extra, Mapping) else extra
    return [c for v in values if (c := _token_content(v)) is not None]


def _as_id_set(value: Any) -> set[int]:
    if isinstance(value, bool) or value is None:
        return set()
    if isinstance(value, int):
        return {value}
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        return {v for v in value if isinstance(v, int) and not isinstance(v, bool)}
    return set()


def _first_id(value: Any) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class Tokenizer:
    """Text <-> token ids for one model, with its special tokens and chat template.

    Build it with `from_pretrained(dir)` (a Hugging Face model or tokenizer directory) or
    `from_parts(...)` (e.g. from a GGUF file). `encode(text, add_special_tokens=True)`
    adds what tokenizer.json's post-processor adds (Llama's BOS); a tokenizer without a
    post-processor adds BOS / EOS when the config says `add_bos_token` / `add_eos_token`.
    `vocab_size` counts every id the tokenizer knows, added tokens included (transformers'
    `len(tokenizer)`); the model's embedding may be larger.
    """

    def __init__(
        self,
        hf_tokenizer: tokenizers.Tokenizer,
        config: Mapping[str, Any],
        generation_config: Mapping[str, Any] | None = None,
    ):
        self._config = dict(config)
        self._named_tokens = _named_special_tokens(self._config)
        self._extra_tokens = _extra_special_tokens(self._config)
        self._hf = self._with_special_tokens_marked(hf_tokenizer)
        self._templates = ChatTemplates.from_config_value(self._config.get("chat_template"))
        generation = dict(generation_config or {})

        self.vocab_size: int = self._hf.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = self._named_id("bos_token", _first_id(generation.get("bos_token_id")))
        self.eos_token_id = self._named_id("eos_token", _first_id(generation.get("eos_token_id")))
        self.pad_token_id = self._named_id("pad_token", _first_id(generation.get("pad_token_id")))
        eos_ids = _as_id_set(generation.get("eos_token_id"))
        if self.eos_token_id is not None:
            eos_ids.add(self.eos_token_id)
        self.eos_token_ids: frozenset[int] = frozenset(eos_ids)
        self.special_token_ids: frozenset[int] = frozenset(
            i for i, tok in self._hf.get_added_tokens_decoder().items() if tok.special
        )
        self.chat_template: str | None = self._templates.default
        self._add_bos, self._add_eos = self._fallback_bos_eos()

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json, tokenizer_config.json and friends from a model directory."""
        directory = Path(path)
        if not directory.is_dir():
            raise ModelLoadError(f"tokenizer directory {directory} does not exist")
        return cls(
            files.load_hf_tokenizer(directory),
            files.read_tokenizer_config(directory),
            files.read_generation_config(directory),
        )

    @classmethod
    def from_parts(
        cls,
        hf_tokenizer: tokenizers.Tokenizer,
        config: dict,
        generation_config: dict | None = None,
    ) -> Tokenizer:
        """Build from an in-memory tokenizer and a tokenizer_config-shaped dict (with
        bos_token, eos_token, add_bos_token, chat_template, ...)."""
        return cls(hf_tokenizer, config, generation_config)

    # -- construction helpers -------------------------------------------------------

    def _with_special_tokens_marked(self, hf: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
        """Make every named special token a special token of the backend, adding those the
        vocabulary lacks, as transformers does on load (so decode skips them).

        The caller's tokenizer is copied first rather than changed."""
        marked = {t.content for t in hf.get_added_tokens_decoder().values() if t.special}
        needed = [
            tok for tok in dict.fromkeys([*self._named_tokens.values(), *self._extra_tokens])
            if tok not in marked
        ]
        if not needed:
            return hf
        hf = tokenizers.Tokenizer.from_str(hf.to_str())
        hf.add_special_tokens(
            [tokenizers.AddedToken(tok, special=True, normalized=False) for tok in needed]
        )
        return hf

    def _named_id(self, name: str, fallback: int | None) -> int | None:
        """The id of the config's `name` token; generation_config's only when the config
        does not mention the token at all (an explicit null means "none")."""
        if name not in self._config:
            return fallback
        token = self._named_tokens.get(name)
        return self._hf.token_to_id(token) if token is not None else None

    def _fallback_bos_eos(self) -> tuple[bool, bool]:
        if self._hf.post_processor is not None:
            return False, False
        add_bos = bool(self._config.get("add_bos_token")) and self.bos_token_id is not None
        add_eos = bool(self._config.get("add_eos_token")) and self.eos_token_id is not None
        return add_bos, add_eos

    # -- text <-> ids ---------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise InvalidRequestError(f"text to encode must be a string, got {type(text).__name__}")
        ids = self._hf.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self._add_bos:
            ids.insert(0, self.bos_token_id)
        if add_special_tokens and self._add_eos:
            ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; ids the vocabulary does not have decode to nothing."""
        try:
            return self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens)
        except (OverflowError, TypeError) as e:
            raise InvalidRequestError(f"token ids must be non-negative integers: {e}") from e

    def token_to_id(self, token: str) -> int | None:
        return self._hf.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        if not isinstance(i, int) or i < 0:
            return None
        return self._hf.id_to_token(i)

    def get_vocab(self) -> dict[str, int]:
        """Token string -> id for every token, added tokens included."""
        return self._hf.get_vocab(with_added_tokens=True)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying Hugging Face tokenizer (read it; do not modify it)."""
        return self._hf

    @property
    def special_tokens(self) -> dict[str, str]:
        """Named special tokens (bos_token, eos_token, ...) as chat templates see them."""
        return dict(self._named_tokens)

    # -- chat -----------------------------------------------------------------------

    @property
    def chat_templates(self) -> dict[str, str]:
        """All named templates of the model ("default", maybe "tool_use", ...)."""
        return dict(self._templates.sources)

    def apply_chat_template(
        self,
        messages: list[dict],
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """Render `messages` to the prompt text, as transformers'
        `apply_chat_template(..., tokenize=False)` does.

        Extra keyword arguments become template variables (e.g. `enable_thinking`,
        `date_string`, `documents`) and override the special-token variables. Encode the
        result with `add_special_tokens=False`: templates write their own BOS.
        Raises ChatTemplateError when there is no template or it rejects the conversation.
        """
        name = self._templates.select(tools)
        documents = plain_template_data(kwargs.pop("documents", None))
        variables = {**self._named_tokens, **plain_template_data(kwargs)}
        variables.update(
            messages=prepare_messages(messages),
            tools=prepare_tools(tools),
            documents=documents,
            add_generation_prompt=add_generation_prompt,
        )
        return self._templates.render(name, variables)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token_id}, "
            f"eos={sorted(self.eos_token_ids)}, chat_templates={sorted(self._templates.sources)})"
        )
