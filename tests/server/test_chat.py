"""Chat completions through the real openai client: whole and streamed answers, usage,
cached prompt tokens, n, logprobs, stop strings, seeds, template inputs."""

from __future__ import annotations

from tests.server.conftest import MODEL_NAME

HELLO = [{"role": "user", "content": "Hello, world! How are you today?"}]


def _stream_text(stream) -> tuple[list[str], list]:
    texts, chunks = {}, []
    for chunk in stream:
        chunks.append(chunk)
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    return [texts[i] for i in sorted(texts)], chunks


def test_whole_answer_and_usage(client, tokenizer):
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=HELLO, max_tokens=8, temperature=0
    )
    prompt = tokenizer.encode(tokenizer.apply_chat_template(HELLO), add_special_tokens=False)
    assert r.object == "chat.completion" and r.model == MODEL_NAME and r.id.startswith("chatcmpl-")
    (choice,) = r.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(prompt)
    assert 1 <= r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_stream_matches_whole_answer_and_reports_usage(client):
    kwargs = dict(
        model="default",
        messages=HELLO,
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    whole = client.chat.completions.create(**kwargs)
    stream = client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    )
    (text,), chunks = _stream_text(stream)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == ["length"]
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_repeated_prompt_reports_cached_tokens(client):
    messages = [{"role": "system", "content": "You are a careful assistant. " * 6}, *HELLO]
    first = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=2)
    second = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=2)
    assert first.usage.prompt_tokens == second.usage.prompt_tokens > 32
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    assert second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens


def test_n_choices_whole_and_streamed(client):
    kwargs = dict(model=MODEL_NAME, messages=HELLO, max_tokens=6, n=3, seed=7, temperature=1.0)
    whole = client.chat.completions.create(**kwargs)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert 3 <= whole.usage.completion_tokens <= 18
    texts, _ = _stream_text(client.chat.completions.create(**kwargs, stream=True))
    assert texts == [c.message.content for c in whole.choices]


def test_seed_makes_sampling_repeatable(client):
    kwargs = dict(model=MODEL_NAME, messages=HELLO, max_tokens=10, temperature=1.0, seed=1234)
    a = client.chat.completions.create(**kwargs).choices[0].message.content
    b = client.chat.completions.create(**kwargs).choices[0].message.content
    assert a == b


def test_logprobs(client):
    r = client.chat.completions.create(
        model=MODEL_NAME,
        messages=HELLO,
        max_tokens=5,
        logprobs=True,
        top_logprobs=3,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 5
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.logprob == max(t.logprob for t in entry.top_logprobs)  # greedy


def test_stop_string_cuts_the_answer(client):
    kwargs = dict(
        model=MODEL_NAME,
        messages=HELLO,
        max_tokens=24,
        temperature=1.0,
        seed=3,
        extra_body={"ignore_eos": True},
    )
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    ascii_pairs = [full[i : i + 2] for i in range(len(full) // 2, len(full) - 1)]
    stop = next(p for p in ascii_pairs if p.isascii() and p.strip() == p and p.isprintable())
    cut = client.chat.completions.create(**kwargs, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.message.content == full[: full.index(stop)]


def test_ignore_eos_and_penalties_and_extras(client):
    r = client.chat.completions.create(
        model=MODEL_NAME,
        messages=HELLO,
        max_completion_tokens=9,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        top_p=0.9,
        extra_body={"ignore_eos": True, "top_k": 20, "min_tokens": 9},
    )
    assert r.usage.completion_tokens == 9 and r.choices[0].finish_reason == "length"


def test_template_inputs_text_parts_developer_and_tool_history(client):
    messages = [
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Weather"}, {"type": "text", "text": "in Paris?"}],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    r = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=3)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_models_lists_both_names(client, server):
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL_NAME, "default"]
    assert client.models.retrieve("default").id == "default"
    with server.http() as http:
        assert http.get("/health").json() == {"status": "ok"}
