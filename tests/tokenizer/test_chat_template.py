"""Chat templates render exactly as transformers' apply_chat_template(tokenize=False)."""

from __future__ import annotations

import copy
import json

import pytest
from tokenizers import Tokenizer as HFTokenizer

from agentcpu.errors import ChatTemplateError, InvalidRequestError
from agentcpu.tokenizer import Tokenizer
from tests.tokenizer.fixtures import make_bpe_tokenizer_dir
from tests.tokenizer.templates import LLAMA3_1_TEMPLATE, QWEN2_5_TEMPLATE

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Météo actuelle d'une ville (天气)",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name, e.g. Zürich"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search the web",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
        },
    },
]

SYSTEM = {"role": "system", "content": "You are a terse assistant. Réponds en français."}
USER = {"role": "user", "content": "What's the weather in Zürich? 😀 天气怎么样"}
ANSWER = {"role": "assistant", "content": "It is 21 °C and sunny."}
FOLLOW_UP = {"role": "user", "content": "  And tomorrow?  "}


def _call(name: str, arguments: dict, call_id: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


ONE_CALL = {
    "role": "assistant",
    "content": None,
    "tool_calls": [_call("get_weather", {"city": "Zürich", "unit": "celsius"}, "call_1")],
}
TWO_CALLS = {
    "role": "assistant",
    "content": "Let me check both.",
    "tool_calls": [
        _call("get_weather", {"city": "Zürich"}, "call_1"),
        _call("search", {"q": "météo demain"}, "call_2"),
    ],
}
RESULT_1 = {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21, "sky": "晴"}'}
RESULT_2 = {"role": "tool", "tool_call_id": "call_2", "content": "Sunny tomorrow."}

COMMON_CONVERSATIONS = {
    "user": [USER],
    "system_user": [SYSTEM, USER],
    "multi_turn": [SYSTEM, USER, ANSWER, FOLLOW_UP],
    "tool_round_trip": [SYSTEM, USER, ONE_CALL, RESULT_1, ANSWER],
    "pending_tool_result": [USER, ONE_CALL, RESULT_1],
}
QWEN_ONLY_CONVERSATIONS = {
    "parallel_calls": [SYSTEM, USER, TWO_CALLS, RESULT_1, RESULT_2, ANSWER, FOLLOW_UP],
}
CASES = [
    (kind, name, conversation)
    for kind, extra in (("qwen2.5", QWEN_ONLY_CONVERSATIONS), ("llama3", {}))
    for name, conversation in {**COMMON_CONVERSATIONS, **extra}.items()
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("with_tools", [False, True])
@pytest.mark.parametrize(
    ("kind", "name", "conversation"), CASES, ids=[f"{k}-{n}" for k, n, _ in CASES]
)
def test_matches_transformers(
    tokenizers_by_kind, references, kind, name, conversation, with_tools, add_generation_prompt
):
    tools = TOOLS if with_tools else None
    ours = tokenizers_by_kind[kind].apply_chat_template(
        copy.deepcopy(conversation), tools=tools, add_generation_prompt=add_generation_prompt
    )
    expected = references[kind].apply_chat_template(
        copy.deepcopy(conversation),
        tools=tools,
        add_generation_prompt=add_generation_prompt,
        tokenize=False,
    )
    assert ours == expected


def test_matches_transformers_metaspace_llama2(tokenizers_by_kind, references):
    conversation = [SYSTEM, USER, ANSWER, FOLLOW_UP]
    ours = tokenizers_by_kind["metaspace"].apply_chat_template(conversation)
    assert ours == references["metaspace"].apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=False
    )
    assert ours.startswith("<s>[INST] <<SYS>>\n")


def test_extra_kwargs_reach_the_template(tokenizers_by_kind, references):
    conversation = [SYSTEM, USER]
    ours = tokenizers_by_kind["llama3"].apply_chat_template(
        conversation, tools=TOOLS, date_string="01 Jan 2030", tools_in_user_message=False
    )
    expected = references["llama3"].apply_chat_template(
        conversation, tools=TOOLS, date_string="01 Jan 2030", tools_in_user_message=False,
        add_generation_prompt=True, tokenize=False,
    )
    assert ours == expected
    assert "Today Date: 01 Jan 2030" in ours
    assert '    "name": "get_weather"' in ours  # tojson(indent=4)


def test_tool_schemas_keep_non_ascii(tokenizers_by_kind):
    prompt = tokenizers_by_kind["qwen2.5"].apply_chat_template([USER], tools=TOOLS)
    assert json.dumps(TOOLS[0], ensure_ascii=False) in prompt
    assert "Zürich" in prompt and "\\u" not in prompt


def test_qwen_renders_hermes_tool_calls(tokenizers_by_kind):
    prompt = tokenizers_by_kind["qwen2.5"].apply_chat_template(
        [USER, TWO_CALLS, RESULT_1, RESULT_2], tools=TOOLS, add_generation_prompt=True
    )
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>' in prompt
    assert "<|im_start|>user\n<tool_response>\n" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert "<tools>\n" in prompt and "\n</tools>" in prompt


def _dir_with_template(tmp_path, template, **kwargs) -> Tokenizer:
    return Tokenizer.from_pretrained(make_bpe_tokenizer_dir(tmp_path / "tok", template, **kwargs))


def test_named_templates_pick_tool_use_when_tools_given(tmp_path):
    templates = [
        {"name": "default", "template": "plain:{{ messages[0].content }}"},
        {"name": "tool_use", "template": "tools:{{ tools | length }}"},
    ]
    tok = _dir_with_template(tmp_path, templates)
    assert tok.chat_template == "plain:{{ messages[0].content }}"
    assert tok.apply_chat_template([USER]) == f"plain:{USER['content']}"
    assert tok.apply_chat_template([USER], tools=TOOLS) == "tools:2"


def test_named_templates_without_default_raise(tmp_path):
    tok = _dir_with_template(tmp_path, [{"name": "tool_use", "template": "x"}])
    with pytest.raises(ChatTemplateError, match="tool_use"):
        tok.apply_chat_template([USER])
    assert tok.apply_chat_template([USER], tools=TOOLS) == "x"


@pytest.mark.parametrize("template_file", ["jinja", "json"])
def test_template_from_separate_files(tmp_path, references, template_file):
    tok = _dir_with_template(tmp_path, QWEN2_5_TEMPLATE, template_file=template_file)
    assert tok.chat_template == QWEN2_5_TEMPLATE
    assert tok.apply_chat_template([SYSTEM, USER]) == references["qwen2.5"].apply_chat_template(
        [SYSTEM, USER], add_generation_prompt=True, tokenize=False
    )


def test_jinja_file_wins_over_config(tmp_path):
    path = make_bpe_tokenizer_dir(tmp_path / "tok", "from config")
    (path / "chat_template.jinja").write_text("from file", encoding="utf-8")
    assert Tokenizer.from_pretrained(path).apply_chat_template([USER]) == "from file"


def test_missing_template_is_a_typed_error(tmp_path):
    tok = _dir_with_template(tmp_path, None)
    assert tok.chat_template is None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.apply_chat_template([USER])
    assert issubclass(ChatTemplateError, InvalidRequestError)


def test_raise_exception_and_bad_input_are_typed_errors(tokenizers_by_kind):
    llama3 = tokenizers_by_kind["llama3"]
    with pytest.raises(ChatTemplateError, match="single tool-calls"):
        llama3.apply_chat_template([USER, TWO_CALLS])
    with pytest.raises(ChatTemplateError):
        llama3.apply_chat_template([])
    with pytest.raises(ChatTemplateError):
        llama3.apply_chat_template(["not a message"])
    with pytest.raises(ChatTemplateError):
        llama3.apply_chat_template([USER], tools="get_weather")


def test_syntax_error_is_a_typed_error(tmp_path):
    tok = _dir_with_template(tmp_path, "{% if %}")
    with pytest.raises(ChatTemplateError, match="does not compile"):
        tok.apply_chat_template([USER])


def test_template_helpers_and_sandbox(tmp_path):
    template = (
        "{{ strftime_now('%Y') | length }}|{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}|"
        "{% set ns = namespace(n=0) %}{% set ns.n = 3 %}{{ ns.n }}|{{ dict(a=1) | tojson }}|"
        "{% generation %}gen{% endgeneration %}|{{ enable_thinking }}|"
        "{{ messages[0].reasoning_content }}|{{ 'content' in messages[1] }}"
    )
    tok = _dir_with_template(tmp_path, template)
    messages = [{"role": "assistant", "reasoning": "hmm", "content": "x"}, {"role": "user", "content": None}]
    rendered = tok.apply_chat_template(messages, enable_thinking=False)
    assert rendered == "4||<|im_end|>|<|endoftext|>|assistant|3|{\"a\": 1}|gen|False|hmm|False"
    assert messages[1] == {"role": "user", "content": None}  # caller's messages untouched

    escape = _dir_with_template(tmp_path / "escape", "{{ messages.__class__.__mro__ }}")
    with pytest.raises(ChatTemplateError):
        escape.apply_chat_template([USER])
    mutate = _dir_with_template(tmp_path / "mutate", "{{ messages.append(1) }}")
    with pytest.raises(ChatTemplateError):
        mutate.apply_chat_template([USER])


def test_template_is_compiled_once(tokenizers_by_kind):
    templates = tokenizers_by_kind["qwen2.5"]._templates
    tokenizers_by_kind["qwen2.5"].apply_chat_template([USER])
    first = templates.compiled("default")
    tokenizers_by_kind["qwen2.5"].apply_chat_template([USER, ANSWER, FOLLOW_UP])
    assert templates.compiled("default") is first


def test_from_parts_takes_template_from_config(tokenizer_dirs):
    hf = HFTokenizer.from_file(str(tokenizer_dirs["qwen2.5"] / "tokenizer.json"))
    tok = Tokenizer.from_parts(hf, {"eos_token": "<|im_end|>", "chat_template": QWEN2_5_TEMPLATE})
    assert tok.apply_chat_template([USER], add_generation_prompt=False).endswith("<|im_end|>\n")
    tok3 = Tokenizer.from_parts(hf, {"bos_token": "<|im_start|>", "chat_template": LLAMA3_1_TEMPLATE})
    assert tok3.apply_chat_template([USER]).startswith("<|im_start|><|start_header_id|>system")
