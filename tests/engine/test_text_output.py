"""Output text from the engine: stop strings cut exactly, streamed deltas add up, the
token that ends a request (EOS / stop id) contributes no text."""

from __future__ import annotations

import pytest

from agentcpu.engine.sampling_params import SamplingParams
from tests.engine.helpers import make_engine
from tests.models.reference import make_checkpoint
from tests.tokenizer.fixtures import make_bpe_tokenizer_dir


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = make_bpe_tokenizer_dir(tmp_path_factory.mktemp("textmodel"))
    import tokenizers

    vocab = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab_size()
    make_checkpoint(path, "qwen2", vocab_size=vocab)
    return make_engine(path)


def _run(engine, prompt, params):
    engine.add_request(prompt, params)
    deltas, last = [], None
    while engine.has_unfinished():
        for out in engine.step():
            deltas.append(out.delta_text)
            last = out
    return "".join(deltas), last


def test_deltas_add_up_and_stop_string_cuts(engine):
    prompt = engine.tokenizer.encode("Hello there, how are you?")
    full, out = _run(engine, prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    assert full == out.text == engine.tokenizer.decode(out.token_ids)
    assert len(full) > 10
    stop = full[5:8]
    cut, out2 = _run(engine, prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=[stop]))
    assert cut == full[: full.index(stop)]
    assert out2.finish_reason == "stop" and out2.stop_reason == stop


def test_stop_token_contributes_no_text(engine):
    prompt = engine.tokenizer.encode("Hello there, how are you?")
    full, out = _run(engine, prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    stop_id = out.token_ids[5]
    params = SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop_id], skip_special_tokens=False)
    text, out2 = _run(engine, prompt, params)
    assert out2.token_ids == out.token_ids[:6]
    assert out2.stop_reason == stop_id
    assert text == engine.tokenizer.decode(out.token_ids[:5], skip_special_tokens=False)
