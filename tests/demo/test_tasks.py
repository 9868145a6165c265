import random

from agentcpu.demo.chat_format import assistant_spans, render_chat
from agentcpu.demo.tasks import (
    TOOL_SCHEMAS,
    Task,
    ToolCall,
    check_answer,
    generate_task,
    generate_tasks,
    task_messages,
)
from agentcpu.demo.tools import run_tool


def test_same_seed_gives_same_tasks():
    assert generate_tasks(7, 50) == generate_tasks(7, 50)
    assert generate_tasks(7, 50) != generate_tasks(8, 50)


def test_every_kind_appears_and_reference_answers_check():
    rng = random.Random(0)
    tasks = [generate_task(rng) for _ in range(2000)]
    kinds = {t.kind for t in tasks}
    assert {"calculate", "convert", "weather", "days", "compare", "weather_convert",
            "convert_calculate", "weeks", "unknown_city", "greeting", "refusal"} <= kinds
    for task in tasks:
        assert check_answer(task, task.final_answer), task
        assert task.uses_tools == bool(task.rounds)


def test_reference_tool_results_come_from_the_real_tools():
    for task in generate_tasks(3, 300):
        for calls, results in zip(task.rounds, task.tool_results, strict=True):
            assert [run_tool(c.name, c.arguments) for c in calls] == results


def test_check_answer_needs_the_whole_value():
    task = Task("calculate", "What is 123 * 4?", [[ToolCall("calculator", {"expression": "123 * 4"})]],
                "123 * 4 = 492", "= 492")
    assert check_answer(task, "123 * 4 = 492")
    assert check_answer(task, "The answer: 123 * 4 = 492.")
    assert not check_answer(task, "123 * 4 = 4920")
    assert not check_answer(task, "123 * 4 = 492.5")
    assert not check_answer(task, "123 * 4 = 491")
    assert not check_answer(task, "")


TOOL_CONVERSATION_TAIL = (
    "<|im_start|>user\nWhich is warmer, Oslo or Lima?<|im_end|>\n"
    "<|im_start|>assistant\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima"}}\n</tool_call>'
    "<|im_end|>\n"
    "<|im_start|>user\n<tool_response>\n{\"t\": 1}\n</tool_response>\n"
    "<tool_response>\n{\"t\": 2}\n</tool_response><|im_end|>\n"
    "<|im_start|>assistant\nLima is warmer.<|im_end|>\n"
)


def _compare_messages():
    return [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Which is warmer, Oslo or Lima?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "a", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
            {"id": "b", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Lima"}}}]},
        {"role": "tool", "tool_call_id": "a", "content": '{"t": 1}'},
        {"role": "tool", "tool_call_id": "b", "content": '{"t": 2}'},
        {"role": "assistant", "content": "Lima is warmer."},
    ]


def test_template_renders_a_tool_conversation_like_qwen25():
    text = render_chat(_compare_messages(), TOOL_SCHEMAS)
    assert text.startswith("<|im_start|>system\nS\n\n# Tools\n\nYou may call one or more")
    assert "<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"calculator\"" in text
    assert "</tool_call><|im_end|>\n<|im_start|>user\nWhich" in text
    assert text.endswith(TOOL_CONVERSATION_TAIL)


def test_template_without_tools_and_generation_prompt():
    text = render_chat([{"role": "user", "content": "Hi"}], None, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_assistant_spans_cover_only_assistant_turns():
    text = render_chat(_compare_messages(), TOOL_SCHEMAS)
    spans = [text[a:b] for a, b in assistant_spans(text)]
    assert spans[0].startswith("<tool_call>\n") and spans[0].endswith("</tool_call><|im_end|>")
    assert spans[1] == "Lima is warmer.<|im_end|>"


def test_task_messages_are_openai_form():
    task = next(t for t in generate_tasks(5, 100) if t.kind == "compare")
    messages = task_messages(task)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "tool",
                                             "assistant"]
    assert [c["id"] for c in messages[2]["tool_calls"]] == [m["tool_call_id"] for m in messages[3:5]]
