import itertools
from collections import Counter

import numpy as np
import pytest

from engine.sampler import (Sampler, SamplingState, TokenDistribution, compute_probs, draw, make_rng,
                            process_logits)
from engine.sampling_params import SamplingParams

EOS = [7, 9]


# ---- an obviously-correct per-row reference ------------------------------------------------------------------------

def reference_penalised(logits: np.ndarray, params: SamplingParams, prompt: list[int], output: list[int],
                        eos: list[int]) -> np.ndarray:
    x = logits.astype(np.float64)
    vocab = x.size
    if params.repetition_penalty != 1.0:
        for t in set(prompt) | set(output):
            if 0 <= t < vocab:
                x[t] = x[t] / params.repetition_penalty if x[t] > 0 else x[t] * params.repetition_penalty
    for t, count in Counter(output).items():
        x[t] -= params.frequency_penalty * count + params.presence_penalty
    if len(output) < params.min_tokens:
        for t in params.stop_token_ids + ([] if params.ignore_eos else eos):
            x[t] = -np.inf
    return x


def reference_probs(logits: np.ndarray, params: SamplingParams, prompt: list[int], output: list[int],
                    eos: list[int]) -> np.ndarray:
    x = reference_penalised(logits, params, prompt, output, eos)
    if params.temperature == 0:
        p = np.zeros_like(x)
        p[np.argmax(x)] = 1.0
        return p
    x = x / params.temperature
    if 0 < params.top_k < x.size:
        kth = np.sort(x)[::-1][params.top_k - 1]
        x[x < kth] = -np.inf
    p = np.exp(x - x.max())
    p /= p.sum()
    if params.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cumulative = np.cumsum(p[order])
        if (cumulative >= params.top_p).any():
            last = np.flatnonzero(cumulative >= params.top_p)[0]
            p[p < p[order[last]]] = 0.0
            p /= p.sum()
    if params.min_p > 0.0:
        p[p < params.min_p * p.max()] = 0.0
    return p / p.sum()


def make_state(params: SamplingParams, prompt: list[int] = (), output: list[int] = (), seed: int = 0) -> SamplingState:
    return SamplingState(params, make_rng(seed), np.array(prompt, dtype=np.int64), list(output))


def random_history(rng: np.random.Generator, vocab: int) -> tuple[list[int], list[int]]:
    prompt = rng.integers(0, vocab, rng.integers(0, 30)).tolist()
    output = rng.integers(0, vocab, rng.integers(0, 20)).tolist()
    return prompt, output


def random_logits(rng: np.random.Generator, batch: int, vocab: int) -> np.ndarray:
    scale = rng.choice([0.5, 2.0, 6.0], size=(batch, 1))
    return (rng.standard_normal((batch, vocab)) * scale).astype(np.float32)


# ---- distribution against the reference ----------------------------------------------------------------------------

FILTER_COMBOS = list(itertools.product([0.0, 0.5, 1.0, 1.7], [0, -1, 1, 5, 50], [1.0, 0.9, 0.5, 0.05],
                                       [0.0, 0.05, 0.3]))


@pytest.mark.parametrize("vocab", [300, 3000])
def test_filtered_distribution_matches_reference(vocab):
    rng = np.random.default_rng(vocab)
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m) for t, k, p, m in FILTER_COMBOS]
    logits = random_logits(rng, len(params), vocab)
    states = [make_state(p) for p in params]
    probs = compute_probs(logits, states, EOS)
    assert probs.shape == logits.shape
    for row, p in enumerate(params):
        expected = reference_probs(logits[row], p, [], [], EOS)
        np.testing.assert_allclose(probs[row], expected, atol=1e-6, err_msg=str(p))


def test_distribution_with_penalties_and_filters_matches_reference():
    rng = np.random.default_rng(1)
    vocab = 500
    params, histories = [], []
    for _ in range(60):
        params.append(SamplingParams(
            temperature=float(rng.choice([0.0, 0.7, 1.3])), top_k=int(rng.choice([0, 10, 100])),
            top_p=float(rng.choice([1.0, 0.8])), min_p=float(rng.choice([0.0, 0.1])),
            repetition_penalty=float(rng.choice([1.0, 1.3, 0.8])), presence_penalty=float(rng.uniform(-2, 2)),
            frequency_penalty=float(rng.uniform(-2, 2)), min_tokens=int(rng.integers(0, 10)),
            stop_token_ids=[3], ignore_eos=bool(rng.random() < 0.3)))
        histories.append(random_history(rng, vocab))
    logits = random_logits(rng, len(params), vocab)
    states = [make_state(p, *h) for p, h in zip(params, histories)]
    probs = compute_probs(logits, states, EOS)
    for row, (p, (prompt, output)) in enumerate(zip(params, histories)):
        np.testing.assert_allclose(probs[row], reference_probs(logits[row], p, prompt, output, EOS), atol=1e-6)


def test_full_size_vocab_uses_candidates_and_matches_reference():
    # 128k vocab: peaked rows find their nucleus among the candidates, flat rows need the full sort.
    rng = np.random.default_rng(2)
    vocab = 128256
    params = [SamplingParams(temperature=1.0, top_p=0.9), SamplingParams(temperature=0.8, top_p=0.5, top_k=2000),
              SamplingParams(temperature=1.0, top_p=0.95, min_p=0.01), SamplingParams(temperature=1.2, top_k=40)]
    logits = rng.standard_normal((len(params), vocab)).astype(np.float32)
    logits[0] *= 8  # peaked
    states = [make_state(p) for p in params]
    probs = compute_probs(logits, states)
    for row, p in enumerate(params):
        np.testing.assert_allclose(probs[row], reference_probs(logits[row], p, [], [], []), atol=1e-6)


def test_probabilities_do_not_depend_on_the_rest_of_the_batch():
    rng = np.random.default_rng(3)
    vocab = 2000
    params = [SamplingParams(temperature=0.9, top_p=0.8, top_k=100, repetition_penalty=1.2)] + \
             [SamplingParams(temperature=float(t), min_p=0.05) for t in rng.uniform(0, 2, 7)]
    logits = random_logits(rng, len(params), vocab)
    states = [make_state(p, [1, 2, 3], [4, 4]) for p in params]
    batch = compute_probs(logits, states)
    alone = compute_probs(logits[:1], states[:1])
    assert np.array_equal(batch[0], alone[0])


# ---- greedy ---------------------------------------------------------------------------------------------------------

def test_greedy_is_argmax_with_ties_to_lowest_id():
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((5, 100)).astype(np.float32)
    logits[2, [10, 40]] = 50.0
    states = [make_state(SamplingParams(temperature=0)) for _ in range(5)]
    out = Sampler(EOS)(logits, states)
    assert out.token_ids.tolist() == logits.argmax(axis=1).tolist()
    assert out.token_ids[2] == 10
    assert out.logprobs is None


def test_greedy_rows_draw_no_randomness():
    logits = np.random.default_rng(5).standard_normal((2, 50)).astype(np.float32)
    states = [make_state(SamplingParams(temperature=0), seed=1), make_state(SamplingParams(), seed=2)]
    Sampler()(logits, states)
    assert states[0].rng.random() == make_rng(1).random()
    fresh = make_rng(2)
    fresh.random()
    assert states[1].rng.random() == fresh.random()  # exactly one draw per step


def test_greedy_uses_penalised_logits():
    logits = np.zeros((1, 10), dtype=np.float32)
    logits[0, 3], logits[0, 5] = 2.0, 1.9
    state = make_state(SamplingParams(temperature=0, repetition_penalty=1.5), prompt=[3])
    assert Sampler()(logits, [state]).token_ids[0] == 5


# ---- penalties and min_tokens ---------------------------------------------------------------------------------------

def test_repetition_penalty_divides_positive_multiplies_negative_once():
    logits = np.array([[2.0, -2.0, 3.0, 1.0, -1.0]], dtype=np.float32)
    state = make_state(SamplingParams(repetition_penalty=2.0), prompt=[0, 0, 1, 99], output=[1, 3, 3])
    got = process_logits(logits, [state], [])
    np.testing.assert_allclose(got, [[1.0, -4.0, 3.0, 0.5, -1.0]])
    assert logits[0, 0] == 2.0  # input untouched


def test_presence_and_frequency_penalties_apply_to_output_only():
    logits = np.zeros((1, 6), dtype=np.float32)
    state = make_state(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), prompt=[0, 1], output=[1, 2, 2, 2])
    got = process_logits(logits, [state], [])
    np.testing.assert_allclose(got, [[0.0, -0.75, -1.25, 0.0, 0.0, 0.0]])


def test_penalties_match_reference_on_random_histories():
    rng = np.random.default_rng(6)
    vocab = 200
    states, expected = [], []
    logits = random_logits(rng, 30, vocab)
    for row in range(30):
        params = SamplingParams(repetition_penalty=float(rng.uniform(0.5, 2)),
                                presence_penalty=float(rng.uniform(-2, 2)), frequency_penalty=float(rng.uniform(-2, 2)))
        prompt, output = random_history(rng, vocab)
        states.append(make_state(params, prompt, output))
        expected.append(reference_penalised(logits[row], params, prompt, output, []))
    np.testing.assert_allclose(process_logits(logits, states, []), np.array(expected), rtol=1e-5, atol=1e-5)


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = np.zeros((4, 12), dtype=np.float32)
    logits[:, [7, 9, 11]] = [10.0, 9.0, 8.0]  # EOS ids 7, 9 and stop id 11 are the favourites
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[11])
    ignoring = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[11], ignore_eos=True)
    states = [make_state(params, output=[1]), make_state(params, output=[1, 2]),
              make_state(ignoring, output=[1]), make_state(SamplingParams(min_tokens=2, stop_token_ids=[11]))]
    out = Sampler(EOS)(logits, states)
    assert out.token_ids[0] not in (7, 9, 11)
    assert out.token_ids[1] == 7  # min_tokens reached: EOS allowed again
    assert out.token_ids[2] == 7  # ignore_eos: EOS is not a stop, only the stop id is masked
    assert out.token_ids[3] not in (7, 9, 11)
    probs = compute_probs(logits, states, EOS)
    assert probs[3, [7, 9, 11]].sum() == 0.0 and probs[2, 11] == 0.0


# ---- sampling ------------------------------------------------------------------------------------------------------

def test_ties_at_the_top_k_and_top_p_boundary_are_all_kept():
    logits = np.array([[3.0, 1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 0.0, 2.0, 0.0]], dtype=np.float32)
    states = [make_state(SamplingParams(top_k=1)), make_state(SamplingParams(top_p=0.1))]
    probs = compute_probs(logits, states)
    np.testing.assert_allclose(probs, [[1 / 3, 0, 1 / 3, 1 / 3, 0], [1 / 3, 1 / 3, 0, 1 / 3, 0]], atol=1e-6)


class FixedRng:
    def __init__(self, u: float):
        self.u = u

    def random(self) -> float:
        return self.u


def test_draw_is_the_inverse_cdf_in_token_id_order():
    rng = np.random.default_rng(9)
    probs = rng.random(3000).astype(np.float32) * (rng.random(3000) < 0.3)
    probs[256:1024] = 0.0  # whole blocks without mass
    probs[-200:] = 0.0
    probs /= probs.sum()
    cdf = np.cumsum(probs, dtype=np.float64)
    for u in np.concatenate([rng.random(500), [0.0, np.nextafter(1.0, 0.0)]]):
        token = draw(TokenDistribution(None, probs), FixedRng(u))
        assert probs[token] > 0
        assert token == min(np.searchsorted(cdf, u * cdf[-1], side="right"), np.flatnonzero(probs)[-1])
    ids = np.array([5, 17, 40])
    sparse = TokenDistribution(ids, np.array([0.2, 0.5, 0.3], dtype=np.float32))
    assert [draw(sparse, FixedRng(u)) for u in (0.0, 0.19, 0.21, 0.69, 0.71, 0.999)] == [5, 5, 17, 17, 40, 40]


def test_seeded_request_is_reproducible_alone_or_in_any_batch():
    vocab = 1000
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=200, repetition_penalty=1.1, seed=1234)
    step_logits = [random_logits(np.random.default_rng(100 + i), 1, vocab)[0] for i in range(20)]

    def run(batch_of_others: int, position: int, noise_seed: int) -> list[int]:
        noise = np.random.default_rng(noise_seed)
        seeded = SamplingState(params, make_rng(params.seed), np.array([1, 2, 3]))
        others = [SamplingState(SamplingParams(temperature=float(noise.choice([0.0, 0.5, 1.5])), top_p=0.9),
                                make_rng((7, i)), np.arange(5)) for i in range(batch_of_others)]
        states = others[:position] + [seeded] + others[position:]
        sampler = Sampler(EOS)
        for logits_row in step_logits:
            logits = random_logits(noise, len(states), vocab)
            logits[position] = logits_row
            out = sampler(logits, states)
            for state, token in zip(states, out.token_ids):
                state.output_token_ids.append(int(token))
        return seeded.output_token_ids

    alone = run(0, 0, 0)
    assert len(set(alone)) > 1
    assert run(5, 2, 1) == alone
    assert run(12, 12, 2) == alone


def test_sampling_frequencies_approximate_the_probabilities():
    vocab, rows, steps = 10, 2000, 10
    logits = np.tile(np.linspace(-1, 1.5, vocab, dtype=np.float32), (rows, 1))
    params = SamplingParams(temperature=0.8, top_k=7, top_p=0.9)
    states = [make_state(params, seed=i) for i in range(rows)]
    expected = reference_probs(logits[0], params, [], [], [])
    sampler = Sampler()
    counts = np.zeros(vocab)
    for _ in range(steps):
        counts += np.bincount(sampler(logits, states).token_ids, minlength=vocab)
    n = rows * steps
    sigma = np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(counts / n - expected) <= 5 * sigma + 1e-12)
    assert counts[expected == 0].sum() == 0


def test_unseeded_states_from_the_engine_counter_differ():
    params = SamplingParams()
    a = SamplingState.create(params, [1, 2], engine_seed=0, request_counter=0)
    b = SamplingState.create(params, [1, 2], engine_seed=0, request_counter=1)
    c = SamplingState.create(SamplingParams(seed=5), [1], engine_seed=0, request_counter=0)
    assert a.rng.random() != b.rng.random()
    assert c.rng.random() == make_rng(5).random()


# ---- logprobs ------------------------------------------------------------------------------------------------------

def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - x.max() - np.log(np.exp(x - x.max()).sum())


def _check_entry(entry, chosen: int, expected: np.ndarray, k: int) -> None:
    """The chosen token first, then the k largest of `expected` (ties by id), values and ranks as expected."""
    top = np.lexsort((np.arange(expected.size), -expected))[:k].tolist()
    assert entry.token_ids == [chosen] + [t for t in top if t != chosen]
    np.testing.assert_allclose(entry.logprobs, expected[entry.token_ids], rtol=1e-5, atol=1e-5)
    for token, rank in zip(entry.token_ids, entry.ranks):
        expected_rank = top.index(token) + 1 if token in top else 1 + int((expected > expected[token]).sum())
        assert rank == expected_rank


LOGPROB_PARAMS = [SamplingParams(temperature=0, logprobs=5, repetition_penalty=1.5),
                  SamplingParams(temperature=0.7, top_k=3, logprobs=0),
                  SamplingParams(temperature=1.3, top_p=0.5, logprobs=20, repetition_penalty=1.5), SamplingParams()]


def _logprob_batch(mode: str):
    rng = np.random.default_rng(8)
    logits = random_logits(rng, 4, 300)
    states = [make_state(p, [1, 2], [3], seed=i) for i, p in enumerate(LOGPROB_PARAMS)]
    return logits, Sampler(logprobs_mode=mode)(logits, states)


def test_raw_logprobs_are_the_models_log_softmax():
    logits, out = _logprob_batch("raw_logprobs")
    assert out.logprobs is not None and len(out.logprobs) == 4 and out.logprobs[3] is None
    for row in range(3):
        _check_entry(out.logprobs[row], int(out.token_ids[row]), _log_softmax(logits[row]), LOGPROB_PARAMS[row].logprobs)
    assert len(out.logprobs[1].token_ids) == 1  # logprobs=0: the sampled token only


def test_raw_logits_are_the_models_logits():
    logits, out = _logprob_batch("raw_logits")
    for row in range(3):
        _check_entry(out.logprobs[row], int(out.token_ids[row]), logits[row].astype(np.float64),
                     LOGPROB_PARAMS[row].logprobs)


def test_processed_logprobs_are_the_sampled_distribution():
    logits, out = _logprob_batch("processed_logprobs")
    for row in range(3):
        params = LOGPROB_PARAMS[row]
        if params.is_greedy:  # greedy: the penalised logits' log_softmax (no temperature, no truncation)
            expected = _log_softmax(reference_penalised(logits[row], params, [1, 2], [3], []))
        else:
            with np.errstate(divide="ignore"):
                expected = np.log(reference_probs(logits[row], params, [1, 2], [3], []))
        _check_entry(out.logprobs[row], int(out.token_ids[row]), expected, params.logprobs)


def test_processed_logits_are_scaled_and_truncated():
    logits, out = _logprob_batch("processed_logits")
    params = LOGPROB_PARAMS[2]
    kept = reference_probs(logits[2], params, [1, 2], [3], []) > 0
    expected = np.where(kept, reference_penalised(logits[2], params, [1, 2], [3], []) / params.temperature, -np.inf)
    _check_entry(out.logprobs[2], int(out.token_ids[2]), expected, params.logprobs)


def test_logprobs_of_the_whole_vocabulary():
    logits = np.array([[0.0, 3.0, 1.0, 2.0, -1.0]], dtype=np.float32)
    out = Sampler()(logits, [make_state(SamplingParams(temperature=0, logprobs=-1))])
    assert out.logprobs[0].token_ids == [1, 3, 2, 0, 4] and out.logprobs[0].ranks == [1, 2, 3, 4, 5]
    values = out.logprobs[0].logprobs
    assert values == sorted(values, reverse=True) and np.exp(values).sum() == pytest.approx(1.0)


def test_unknown_logprobs_mode_is_an_error():
    with pytest.raises(ValueError, match="logprobs_mode"):
        Sampler(logprobs_mode="penalised")


def test_rejects_mismatched_batch():
    with pytest.raises(ValueError, match="logits"):
        Sampler()(np.zeros((2, 5), dtype=np.float32), [make_state(SamplingParams())])
