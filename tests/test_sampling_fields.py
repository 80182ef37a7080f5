"""logit_bias, allowed_token_ids and bad_words: their effect on the distribution against a NumPy reference, their
checks, and the engine generating under them."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import TINY
from engine.sampler import SamplingState, compute_probs, make_rng
from engine.sampling_params import SamplingParams

VOCAB = 50


def state(params: SamplingParams, output: list[int] = (), bad_word_ids: list[list[int]] = ()) -> SamplingState:
    s = SamplingState(params, make_rng(0), np.array([1, 2], np.int64), list(output))
    s.bad_word_ids = [list(w) for w in bad_word_ids]
    return s


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x[np.isfinite(x)].max())
    return e / e.sum()


@pytest.fixture()
def logits() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((1, VOCAB)).astype(np.float32) * 3


def test_logit_bias_adds_to_the_logits(logits):
    params = SamplingParams(temperature=1.0, logit_bias={"3": 5.0, 7: -100})
    expected = logits[0].copy()
    expected[3] += 5
    expected[7] -= 100
    np.testing.assert_allclose(compute_probs(logits, [state(params)])[0], softmax(expected), rtol=1e-5, atol=1e-7)


def test_allowed_token_ids_keep_only_those(logits):
    params = SamplingParams(temperature=1.0, allowed_token_ids=[4, 9, 11])
    expected = np.full(VOCAB, -np.inf, np.float32)
    expected[[4, 9, 11]] = logits[0, [4, 9, 11]]
    np.testing.assert_allclose(compute_probs(logits, [state(params)])[0], softmax(expected), rtol=1e-5, atol=1e-7)


def test_bad_words_ban_the_last_token_after_the_rest(logits):
    params = SamplingParams(temperature=1.0, bad_words=["x"])
    words = [[5], [8, 9]]  # a one-token word, and a two-token one
    free = compute_probs(logits, [state(params, output=[1], bad_word_ids=words)])[0]
    assert free[5] == 0 and free[9] > 0  # 9 only after 8
    after = compute_probs(logits, [state(params, output=[3, 8], bad_word_ids=words)])[0]
    expected = logits[0].copy()
    expected[[5, 9]] = -np.inf
    np.testing.assert_allclose(after, softmax(expected), rtol=1e-5, atol=1e-7)


def test_rows_without_the_fields_are_untouched(logits):
    batch = np.concatenate([logits, logits])
    probs = compute_probs(batch, [state(SamplingParams(temperature=1.0)),
                                  state(SamplingParams(temperature=1.0, logit_bias={0: 50}))])
    np.testing.assert_allclose(probs[0], softmax(logits[0]), rtol=1e-5, atol=1e-7)
    assert probs[1][0] > 0.99


@pytest.mark.parametrize("fields,name", [
    ({"logit_bias": {1: 101}}, "logit_bias"), ({"logit_bias": {"a": 1}}, "logit_bias"), ({"logit_bias": [1]}, "logit_bias"),
    ({"allowed_token_ids": []}, "allowed_token_ids"), ({"allowed_token_ids": [-1]}, "allowed_token_ids"),
    ({"bad_words": [""]}, "bad_words"), ({"bad_words": "word"}, "bad_words"),
])
def test_bad_values_name_the_field(fields, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        SamplingParams(**fields)


@pytest.fixture(scope="module")
def llm():
    from engine import LLM
    with LLM("demo") as engine:
        yield engine


IMAGE_PROMPT = {"prompt": "What shapes are in the image?", "image": str(TINY / "demo_0.png")}


def test_the_engine_generates_under_each_field(llm):
    greedy = dict(temperature=0, max_tokens=12)
    plain = llm.generate(IMAGE_PROMPT, SamplingParams(**greedy), use_tqdm=False)[0].outputs[0]
    assert "circle" in plain.text
    banned = llm.generate(IMAGE_PROMPT, SamplingParams(**greedy, bad_words=["circle"]), use_tqdm=False)[0].outputs[0]
    assert "circle" not in banned.text and banned.token_ids[:2] == plain.token_ids[:2]
    allowed = sorted(set(plain.token_ids))[:3]
    out = llm.generate(IMAGE_PROMPT, SamplingParams(temperature=1.0, seed=0, max_tokens=8,
                                                    allowed_token_ids=allowed), use_tqdm=False)[0].outputs[0]
    assert set(out.token_ids) <= set(allowed)
    forced = llm.generate(IMAGE_PROMPT, SamplingParams(**greedy, logit_bias={791: 100}), use_tqdm=False)[0].outputs[0]
    assert forced.token_ids[0] == 791


def test_ids_outside_the_vocabulary_fail_alone(llm):
    out = llm.generate("Hi", SamplingParams(allowed_token_ids=[10 ** 6]), use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "error" and "allowed_token_ids" in out.error
