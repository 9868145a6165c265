"""/v1/completions: text, token-id and batched prompts; streaming; ignore_eos; echo."""

from __future__ import annotations

from tests.server.conftest import MODEL_NAME


def test_token_ids_with_ignore_eos_give_exactly_max_tokens(client):
    r = client.completions.create(
        model=MODEL_NAME,
        prompt=[11, 22, 33, 44, 55],
        max_tokens=7,
        temperature=0,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    (choice,) = r.choices
    assert r.object == "text_completion" and choice.finish_reason == "length"
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 7
    assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs) == 7
    assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs)


def test_batches_of_prompts_and_n(client):
    r = client.completions.create(
        model=MODEL_NAME,
        prompt=[[1, 2, 3], [4, 5, 6, 7]],
        n=2,
        max_tokens=3,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.usage.prompt_tokens == 7 and r.usage.completion_tokens == 12
    r = client.completions.create(model=MODEL_NAME, prompt=["The quick", "Hello"], max_tokens=2)
    assert len(r.choices) == 2


def test_stream_reassembles_to_the_whole_answer(client):
    kwargs = dict(
        model=MODEL_NAME,
        prompt="The quick brown fox",
        max_tokens=10,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(
        client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10


def test_echo_and_min_tokens(client):
    r = client.completions.create(
        model=MODEL_NAME,
        prompt="Hello, world!",
        max_tokens=4,
        echo=True,
        extra_body={"min_tokens": 4},
    )
    assert r.choices[0].text.startswith("Hello, world!")
    assert r.usage.completion_tokens == 4
