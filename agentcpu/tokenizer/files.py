"""Read the tokenizer files of a Hugging Face model directory.

Chat templates are looked up as transformers does: `chat_template.jinja` (plus named ones
in `additional_chat_templates/*.jinja`) wins over `chat_template` in tokenizer_config.json;
the legacy processor file `chat_template.json` is used when neither exists.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tokenizers

from agentcpu.errors import ModelLoadError
from agentcpu.tokenizer.chat_template import DEFAULT_TEMPLATE_NAME

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_JSON_FILE = "chat_template.json"
CHAT_TEMPLATE_DIR = "additional_chat_templates"


def read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None when the file does not exist."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def load_hf_tokenizer(directory: Path) -> tokenizers.Tokenizer:
    path = directory / TOKENIZER_FILE
    if not path.is_file():
        raise ModelLoadError(
            f"{TOKENIZER_FILE} not found in {directory} (agentcpu needs the fast-tokenizer file; "
            "a sentencepiece tokenizer.model alone is not supported)"
        )
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises plain Exception for malformed files
        raise ModelLoadError(f"cannot load {path}: {e}") from e


def _read_template_files(directory: Path) -> dict[str, str]:
    templates = {}
    main = directory / CHAT_TEMPLATE_FILE
    if main.is_file():
        templates[DEFAULT_TEMPLATE_NAME] = main.read_text(encoding="utf-8")
    extra_dir = directory / CHAT_TEMPLATE_DIR
    if extra_dir.is_dir():
        for path in sorted(extra_dir.glob("*.jinja")):
            templates[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
    return templates


def _chat_template_value(directory: Path, config: dict) -> Any:
    files = _read_template_files(directory)
    if files:
        return files[DEFAULT_TEMPLATE_NAME] if list(files) == [DEFAULT_TEMPLATE_NAME] else files
    if config.get("chat_template") is not None:
        return config["chat_template"]
    legacy = read_json(directory / CHAT_TEMPLATE_JSON_FILE)
    return legacy.get("chat_template") if legacy else None


def read_tokenizer_config(directory: Path) -> dict:
    """tokenizer_config.json, completed by special_tokens_map.json and the template files."""
    config = read_json(directory / TOKENIZER_CONFIG_FILE) or {}
    for key, value in (read_json(directory / SPECIAL_TOKENS_MAP_FILE) or {}).items():
        if config.get(key) is None:
            config[key] = value
    config["chat_template"] = _chat_template_value(directory, config)
    return config


def read_generation_config(directory: Path) -> dict | None:
    return read_json(directory / GENERATION_CONFIG_FILE)
