import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from agentcpu.engine.sampler import Sampler, SampleRow, _draw
from agentcpu.engine.sampling_params import SamplingParams
from agentcpu.errors import InvalidRequestError

sample = Sampler()
CHI_SQUARE_DF3_P001 = 16.27  # 99.9th percentile of chi-square with 3 degrees of freedom


def row(params=None, prompt=(), output=(), seed=None, banned=(), allowed=None, **kw):
    params = params or SamplingParams(**kw)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return SampleRow(params, list(prompt), list(output), generator, list(banned), allowed)


def greedy_token(logits, **kw):
    kw.setdefault("temperature", 0.0)
    prompt, output = kw.pop("prompt", ()), kw.pop("output", ())
    logits = torch.tensor([logits], dtype=torch.float32)
    return sample(logits, [row(prompt=prompt, output=output, **kw)])[0].token_id


# --- greedy ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_equals_argmax(dtype):
    logits = torch.randn(6, 97, generator=torch.Generator().manual_seed(0)).to(dtype)
    results = sample(logits, [row(temperature=0.0) for _ in range(6)])
    assert [r.token_id for r in results] == logits.float().argmax(dim=-1).tolist()
    assert all(r.logprob is None and r.top_logprobs is None for r in results)


def test_greedy_row_with_nan_gives_what_torch_max_gives():
    """The compiled argmax flags a NaN row; the batch then takes torch.max, whose answer
    (the NaN's index) the engine has always returned."""
    logits = torch.randn(3, 97, generator=torch.Generator().manual_seed(2))
    logits[1, 40] = float("nan")
    results = sample(logits, [row(temperature=0.0) for _ in range(3)])
    assert [r.token_id for r in results] == logits.max(dim=-1).indices.tolist()


def test_greedy_with_logprobs_takes_the_general_path_and_still_equals_argmax():
    logits = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    results = sample(logits, [row(temperature=0.0, logprobs=2) for _ in range(5)])
    assert [r.token_id for r in results] == logits.argmax(dim=-1).tolist()


# --- seeded sampling ------------------------------------------------------------------


def _steps(seed_logits, steps=6, vocab=50):
    gen = torch.Generator().manual_seed(seed_logits)
    return [torch.randn(1, vocab, generator=gen) * 3 for _ in range(steps)]


def _run_alone(params, seed, steps):
    r = row(params, seed=seed)
    return [sample(step, [r])[0].token_id for step in steps]


def test_seeded_sampling_reproduces_across_calls():
    params = SamplingParams(temperature=1.3, top_k=20, top_p=0.9)
    steps = _steps(2)
    first = _run_alone(params, seed=42, steps=steps)
    assert first == _run_alone(params, seed=42, steps=steps)
    other_seeds = {tuple(_run_alone(params, seed=s, steps=steps)) for s in range(8)}
    assert len(other_seeds) > 1, "different seeds should not all give the same tokens"


def test_seeded_row_gives_the_same_tokens_alone_and_in_a_batch():
    params = SamplingParams(temperature=1.0, min_p=0.01)
    steps = _steps(3)
    alone = _run_alone(params, seed=7, steps=steps)
    mine = row(params, seed=7)
    neighbours = [
        row(temperature=0.8, seed=1),
        row(temperature=1.0),  # default RNG
        row(temperature=0.0, logprobs=3),
        row(temperature=2.0, top_k=5, seed=99, output=[1, 2, 3], presence_penalty=1.0),
    ]
    batched = []
    for i, step in enumerate(steps):
        others = torch.randn(len(neighbours), step.shape[1])
        batch = neighbours[: i % 4 + 1]  # vary the batch composition each step
        logits = torch.cat([others[: len(batch) // 2], step, others[len(batch) // 2 : len(batch)]])
        rows = batch[: len(batch) // 2] + [mine] + batch[len(batch) // 2 :]
        batched.append(sample(logits, rows)[len(batch) // 2].token_id)
    assert batched == alone


# --- filters never emit an excluded token ---------------------------------------------


def _softmax(z):
    finite = np.isfinite(z)
    p = np.zeros_like(z)
    p[finite] = np.exp(z[finite] - z[finite].max())
    return p / p.sum()


def _possible_tokens(logits, params, banned, allowed):
    """Tokens the filters may emit, computed independently in float64 (ties and rounding
    at a top-p or min-p boundary are given the benefit of the doubt)."""
    z = np.array(logits, dtype=np.float64)
    z[list(banned)] = -np.inf
    if allowed is not None:
        z[~np.array(allowed)] = -np.inf
    if params.temperature == 0:
        return set(np.flatnonzero(z == z.max()))
    z = z / params.temperature
    if 0 < params.top_k < len(z):
        z[z < np.sort(z)[::-1][params.top_k - 1]] = -np.inf
    p = _softmax(z)
    mass_above = np.array([p[p > pt].sum() for pt in p])
    keep = (p > 0) & (mass_above < params.top_p + 1e-5)
    keep &= p >= params.min_p * p.max() * (1 - 1e-5)
    return set(np.flatnonzero(keep))


@st.composite
def filter_cases(draw):
    vocab = draw(st.integers(2, 24))
    # multiples of 1/8 and power-of-two temperatures keep logits / T exact in float32
    logits = [x / 8 for x in draw(st.lists(st.integers(-48, 48), min_size=vocab, max_size=vocab))]
    params = SamplingParams(
        temperature=draw(st.sampled_from([0.0, 0.5, 1.0, 2.0])),
        top_k=draw(st.integers(-1, vocab + 1)),
        top_p=draw(st.floats(0.01, 1.0)),
        min_p=draw(st.floats(0.0, 1.0)),
    )
    banned = draw(st.sets(st.integers(0, vocab - 1), max_size=vocab // 2))
    allowed = draw(st.none() | st.lists(st.booleans(), min_size=vocab, max_size=vocab))
    return logits, params, banned, allowed


@settings(max_examples=150, deadline=None)
@given(filter_cases())
def test_filters_never_emit_an_excluded_token(case):
    logits, params, banned, allowed = case
    draws = 16
    mask = None if allowed is None else torch.tensor(allowed)
    rows = [row(params, seed=i, banned=sorted(banned), allowed=mask) for i in range(draws)]
    batch = torch.tensor([logits] * draws)
    if all(t in banned or (allowed is not None and not allowed[t]) for t in range(len(logits))):
        with pytest.raises(InvalidRequestError):
            sample(batch, rows)
        return
    possible = _possible_tokens(logits, params, banned, allowed)
    assert {r.token_id for r in sample(batch, rows)} <= possible


def _draw_many(logits, n=400, seed=0, **kw):
    batch = torch.tensor([logits] * n)
    gen = torch.Generator().manual_seed(seed)
    rows = [SampleRow(SamplingParams(**kw), [], [], gen) for _ in range(n)]
    return [r.token_id for r in sample(batch, rows)]


def test_top_p_keeps_the_smallest_set_reaching_top_p():
    logits = np.log([0.5, 0.3, 0.15, 0.05]).tolist()
    assert set(_draw_many(logits, top_p=0.79)) == {0, 1}
    assert set(_draw_many(logits, top_p=0.81)) == {0, 1, 2}
    assert set(_draw_many(logits, top_p=0.01)) == {0}


def test_top_p_applies_to_the_top_k_renormalised_distribution():
    logits = np.log([0.4, 0.3, 0.2, 0.1]).tolist()  # top-2 renormalised: 4/7, 3/7
    assert set(_draw_many(logits, top_k=2, top_p=0.55)) == {0}
    assert set(_draw_many(logits, top_k=2, top_p=0.6)) == {0, 1}


def test_top_k_keeps_ties_with_the_kth_largest_and_min_p_is_relative_to_the_max():
    assert set(_draw_many([2.0, 1.0, 1.0, 0.0], top_k=2)) == {0, 1, 2}
    logits = np.log([0.5, 0.3, 0.15, 0.05]).tolist()
    assert set(_draw_many(logits, min_p=0.29)) == {0, 1, 2}
    assert set(_draw_many(logits, min_p=0.31)) == {0, 1}


def test_a_row_with_no_allowed_token_raises():
    logits = torch.zeros(2, 4)
    ok = row(temperature=1.0)
    with pytest.raises(InvalidRequestError):
        sample(logits, [ok, row(temperature=0.0, allowed=torch.zeros(4, dtype=torch.bool))])
    with pytest.raises(InvalidRequestError):
        sample(logits, [ok, row(banned=[0, 1], allowed=torch.tensor([1, 1, 0, 0]).bool())])


@pytest.mark.parametrize(
    "bad",
    [
        {"banned": [4]},
        {"banned": [-1]},
        {"allowed": torch.ones(3, dtype=torch.bool)},
        {"allowed": torch.ones(4)},
    ],
)
def test_malformed_rows_raise_a_typed_error(bad):
    with pytest.raises(InvalidRequestError):
        sample(torch.zeros(1, 4), [row(**bad)])


def test_wrong_batch_size_raises_a_typed_error():
    with pytest.raises(InvalidRequestError):
        sample(torch.zeros(2, 4), [row()])


# --- penalties ------------------------------------------------------------------------


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    # positive: 3.0 / 2 = 1.5 against a rival at 1.49 and 1.51
    assert greedy_token([3.0, 1.49], repetition_penalty=2.0, output=[0]) == 0
    assert greedy_token([3.0, 1.51], repetition_penalty=2.0, output=[0]) == 1
    # negative: -1.0 * 2 = -2.0 against -1.99 and -2.01
    assert greedy_token([-1.0, -2.01], repetition_penalty=2.0, output=[0]) == 0
    assert greedy_token([-1.0, -1.99], repetition_penalty=2.0, output=[0]) == 1
    # counts once, and covers the prompt too
    assert greedy_token([3.0, 1.49], repetition_penalty=2.0, prompt=[0, 0], output=[0]) == 0
    assert greedy_token([3.0, 1.51], repetition_penalty=2.0, prompt=[0]) == 1
    # a penalty below 1 rewards repetition
    assert greedy_token([1.0, 1.9], repetition_penalty=0.5, output=[0]) == 0


def test_presence_penalty_subtracts_once_per_seen_output_token():
    assert greedy_token([1.0, 0.6], presence_penalty=0.5, output=[0]) == 1
    assert greedy_token([1.0, 0.6], presence_penalty=0.3, output=[0, 0, 0]) == 0
    assert greedy_token([1.0, 0.6], presence_penalty=2.0, prompt=[0]) == 0  # output only
    assert greedy_token([0.6, 1.0], presence_penalty=-0.5, output=[0]) == 0


def test_frequency_penalty_subtracts_per_occurrence_in_the_output():
    assert greedy_token([1.0, 0.6], frequency_penalty=0.2, output=[0]) == 0  # 0.8
    assert greedy_token([1.0, 0.6], frequency_penalty=0.2, output=[0, 0, 0]) == 1  # 0.4
    assert greedy_token([1.0, 0.6], frequency_penalty=2.0, prompt=[0, 0]) == 0  # output only
    both = dict(frequency_penalty=0.1, presence_penalty=0.15, output=[0, 0])
    assert greedy_token([1.0, 0.66], **both) == 1  # 1 - 0.2 - 0.15 = 0.65
    assert greedy_token([1.0, 0.64], **both) == 0


def test_penalties_apply_only_to_their_own_row():
    logits = torch.tensor([[1.0, 0.6], [1.0, 0.6]])
    penalised = row(temperature=0.0, output=[0], presence_penalty=1.0)
    rows = [penalised, row(temperature=0.0, output=[0])]
    assert [r.token_id for r in sample(logits, rows)] == [1, 0]


# --- logprobs -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_come_from_the_raw_distribution(dtype):
    logits = (torch.randn(4, 40, generator=torch.Generator().manual_seed(5)) * 2).to(dtype)
    rows = [
        row(temperature=0.7, logprobs=5, seed=3, banned=[0, 1], presence_penalty=1.0, output=[2]),
        row(temperature=0.0, logprobs=0),
        row(temperature=1.0),
        row(temperature=0.0, logprobs=20, repetition_penalty=1.5, prompt=[4, 5]),
    ]
    results = sample(logits, rows)
    expected = logits.float().log_softmax(dim=-1)
    for i, (r, result) in enumerate(zip(rows, results, strict=True)):
        n = r.params.logprobs
        if n is None:
            assert result.logprob is None and result.top_logprobs is None
            continue
        assert result.logprob == pytest.approx(expected[i, result.token_id].item(), abs=1e-6)
        assert len(result.top_logprobs) == n
        values = [v for _, v in result.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert values == pytest.approx(expected[i].topk(n).values.tolist(), abs=1e-6)
        for token_id, value in result.top_logprobs:
            assert value == pytest.approx(expected[i, token_id].item(), abs=1e-6)


def test_top_logprobs_are_capped_at_the_vocab_size():
    result = sample(torch.tensor([[0.0, 1.0, 2.0]]), [row(logprobs=20)])[0]
    assert [t for t, _ in result.top_logprobs] == [2, 1, 0]


# --- the sampled distribution ---------------------------------------------------------


def _chi_square(tokens, probs):
    counts = np.bincount(tokens, minlength=len(probs))
    expected = np.array(probs) * len(tokens)
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("seeded", [True, False])
def test_temperature_sampling_matches_softmax_of_scaled_logits(seeded):
    logits, temperature, n = [1.0, 0.5, 0.0, -1.0], 0.7, 4000
    probs = _softmax(np.array(logits) / temperature)
    if seeded:
        tokens = _draw_many(logits, n=n, seed=11, temperature=temperature)
    else:
        with torch.random.fork_rng():
            torch.manual_seed(11)
            rows = [row(temperature=temperature) for _ in range(n)]
            tokens = [r.token_id for r in sample(torch.tensor([logits] * n), rows)]
    assert _chi_square(tokens, probs) < CHI_SQUARE_DF3_P001


def test_filtered_sampling_matches_the_renormalised_distribution():
    logits, n = [2.0, 1.0, 0.5, 0.0, -3.0], 4000
    tokens = _draw_many(logits, n=n, seed=12, temperature=1.5, top_k=4)
    probs = _softmax(np.array(logits[:4]) / 1.5)
    assert _chi_square(tokens, probs) < CHI_SQUARE_DF3_P001
    assert math.isclose(sum(probs), 1.0)


@pytest.mark.parametrize("u, expected", [(0.0, 1), (0.3, 1), (0.5, 3), (0.999, 3), (1.0, 3)])
def test_inverse_cdf_draw_never_lands_on_a_token_without_mass(monkeypatch, u, expected):
    """u = 0 and u x total == total (a rounding the guard catches) both stay on tokens
    with mass; the zero-mass tokens 0, 2 and 4 are never returned."""
    def fixed_rand(size=(), **_):
        return torch.full((size,) if isinstance(size, int) else size, u, dtype=torch.float64)

    monkeypatch.setattr(torch, "rand", fixed_rand)
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]])
    assert _draw(probs, [None]).tolist() == [expected]
    assert _draw(probs, [torch.Generator()]).tolist() == [expected]


def test_a_repetition_penalty_that_vanishes_in_float32_is_refused():
    """5e-324 is > 0 as a Python float and 0 in float32 (found by the OpenAPI fuzzer)."""
    with pytest.raises(InvalidRequestError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=5e-324)
    SamplingParams(repetition_penalty=1.2e-38)  # the smallest normal float32 is fine


@pytest.mark.parametrize("temperature", [0.0, 0.3, 1.0])
def test_extreme_penalties_never_draw_past_the_vocabulary(temperature):
    """A seen token's logit divided by a tiny penalty overflows to inf; a banned one
    (-inf) times it becomes NaN. The sampler still returns a real, unbanned token."""
    vocab = 50
    logits = torch.linspace(-3, 3, vocab).repeat(4, 1)
    params = SamplingParams(temperature=temperature, repetition_penalty=1.2e-38)
    rows = [row(params, prompt=[49, 48, 3], seed=i, banned=[49]) for i in range(4)]
    for result in sample(logits, rows):
        assert 0 <= result.token_id < vocab and result.token_id != 49
