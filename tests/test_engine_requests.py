"""Per-request behaviour through the engine: seeds, stops, lengths, logprobs, and bad requests failing alone."""
from __future__ import annotations

import pytest

from conftest import TINY
from engine import LLM, SamplingParams
from engine.outputs import accumulate

IMAGE = str(TINY / "demo_0.png")
DESCRIBE = {"prompt": "Describe the image.", "image": IMAGE}


@pytest.fixture(scope="module")
def llm():
    engine = LLM("demo", seed=0, max_model_len=256)
    yield engine
    stats = engine.stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]


def _one(llm, prompt, params):
    return llm.generate(prompt, params, use_tqdm=False)[0]


def test_seeded_request_same_alone_and_in_any_batch(llm):
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=16, ignore_eos=True)
    alone = _one(llm, DESCRIBE, params).outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=n, ignore_eos=True) for n in (3, 20, 9)]
    batch_prompts = ["Hello", DESCRIBE, {"prompt": "Who are you?"}, {"prompt": "How many?", "image": IMAGE}]
    for position in range(len(batch_prompts)):
        prompts = batch_prompts[:position] + [DESCRIBE] + batch_prompts[position:]
        params_list = others[:position] + [params] + others[position:] + [SamplingParams(max_tokens=2)]
        params_list = params_list[:len(prompts)]
        outs = llm.generate(prompts, params_list, use_tqdm=False)
        assert outs[position].outputs[0].token_ids == alone
    assert len(alone) == 16


def test_unseeded_requests_differ_but_the_engine_seed_reproduces(llm):
    params = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    outs = llm.generate([DESCRIBE] * 4, params, use_tqdm=False)
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) > 1
    fresh = LLM("demo", seed=7, max_model_len=256)
    again = LLM("demo", seed=7, max_model_len=256)
    a = fresh.generate([DESCRIBE] * 2, params, use_tqdm=False)
    b = again.generate([DESCRIBE] * 2, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]


def test_stop_at_eos_and_ignore_eos(llm, goldens):
    ex = next(e for e in goldens["demo"]["examples"] if e["image"] == "demo_0.png" and e["prompt"] == DESCRIBE["prompt"])
    stopped = _one(llm, DESCRIBE, SamplingParams(temperature=0, max_tokens=40)).outputs[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == ex["token_ids"]
    ignoring = _one(llm, DESCRIBE, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)).outputs[0]
    assert ignoring.finish_reason == "length" and len(ignoring.token_ids) == 40
    assert ignoring.token_ids[:len(ex["token_ids"])] == ex["token_ids"]
    assert ignoring.token_ids[len(ex["token_ids"])] in (128001, 128009)


def test_max_tokens_and_min_tokens(llm):
    short = _one(llm, DESCRIBE, SamplingParams(temperature=0, max_tokens=3)).outputs[0]
    assert short.finish_reason == "length" and len(short.token_ids) == 3
    text_only = {"prompt": "How many shapes are there?"}  # answers then EOS quickly
    plain = _one(llm, text_only, SamplingParams(temperature=0, max_tokens=30)).outputs[0]
    assert plain.finish_reason == "stop"
    forced = _one(llm, text_only, SamplingParams(temperature=0, max_tokens=30,
                                                 min_tokens=len(plain.token_ids) + 3)).outputs[0]
    assert len(forced.token_ids) >= len(plain.token_ids) + 3
    assert not set(forced.token_ids[:len(plain.token_ids) + 3]) & {128001, 128009}


def test_stop_token_ids(llm, goldens):
    ex = next(e for e in goldens["demo"]["examples"] if e["image"] == "demo_0.png" and e["prompt"] == DESCRIBE["prompt"])
    stop_id = ex["token_ids"][3]
    out = _one(llm, DESCRIBE, SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_id])).outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    assert out.token_ids == ex["token_ids"][:3]


def test_stop_strings_across_tokens_are_removed(llm, goldens):
    ex = next(e for e in goldens["demo"]["examples"] if e["image"] == "demo_0.png" and e["prompt"] == DESCRIBE["prompt"])
    full = ex["text"]  # "two shapes on a grey background: a black circle and a purple triangle"
    stop = "grey back"  # spans the tokens " grey" and " background"
    out = _one(llm, DESCRIBE, SamplingParams(temperature=0, max_tokens=30, stop=[stop])).outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full[:full.index(stop)].lstrip()
    assert stop not in out.text


def test_logprobs(llm):
    out = _one(llm, DESCRIBE, SamplingParams(temperature=0, max_tokens=5, logprobs=3, ignore_eos=True)).outputs[0]
    assert len(out.logprobs) == 5
    for token, entry in zip(out.token_ids, out.logprobs):
        assert list(entry)[0] == token and entry[token].rank == 1  # greedy picks the most likely
        assert entry[token].decoded_token == llm.tokenizer.decode([token])
        assert max(e.logprob for e in entry.values()) == pytest.approx(entry[token].logprob)
        assert all(e.logprob <= 0 for e in entry.values()) and len(entry) == 3
        assert sorted(e.rank for e in entry.values()) == [1, 2, 3]
    assert out.cumulative_logprob == pytest.approx(sum(entry[t].logprob for t, entry in zip(out.token_ids,
                                                                                          out.logprobs)))


def test_bad_requests_fail_alone(llm, tmp_path):
    good = [{"prompt": "Hello"}, DESCRIBE]
    bad_image = tmp_path / "bad.png"
    bad_image.write_bytes(b"definitely not an image")
    bad = [
        ({"prompt": "word " * 400}, SamplingParams(max_tokens=4), "max_model_len"),
        ({"prompt": "What is this?", "image": str(bad_image)}, SamplingParams(max_tokens=4), "ImageError"),
        ({"prompt": "hi"}, {"temperature": -1.0}, "temperature"),
        ({"prompt": "hi", "template": "poem"}, SamplingParams(max_tokens=4), "template"),
        ({"prompt": "hi", "colour": "red"}, SamplingParams(max_tokens=4), "colour"),
        ({"prompt": "hi", "image": [IMAGE, IMAGE]}, SamplingParams(max_tokens=4), "one image"),
    ]
    prompts = [good[0]] + [b[0] for b in bad] + [good[1]]
    params = [SamplingParams(temperature=0, max_tokens=6)] + [b[1] for b in bad] + \
             [SamplingParams(temperature=0, max_tokens=6)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert outs[0].error is None and len(outs[0].outputs[0].token_ids) > 0
    assert outs[-1].error is None and len(outs[-1].outputs[0].token_ids) > 0
    for out, (_, _, needle) in zip(outs[1:-1], bad):
        assert out.finished and out.outputs[0].finish_reason == "error"
        assert out.error and needle in out.error, out.error


def test_invalid_sampling_params_raise_naming_the_field():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)


def test_metrics_are_ordered(llm):
    out = _one(llm, DESCRIBE, SamplingParams(temperature=0, max_tokens=4))
    m = out.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time


def test_abort_frees_blocks():
    from engine.llm_engine import LLMEngine
    engine = LLMEngine("demo", max_model_len=256)
    engine.add_request("a", DESCRIBE, SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("b", {"prompt": "Hello"}, SamplingParams(max_tokens=50, ignore_eos=True))
    by_id = {}
    for _ in range(3):
        for delta in engine.step():
            accumulate(by_id, delta)
    assert engine.stats()["num_free_blocks"] < engine.stats()["num_total_blocks"]
    engine.abort_request("a")
    while engine.has_unfinished_requests():
        for delta in engine.step():
            accumulate(by_id, delta)
    assert by_id["a"].outputs[0].finish_reason == "abort"
    assert by_id["b"].outputs[0].finish_reason == "length" and len(by_id["b"].outputs[0].token_ids) == 50
    assert engine.stats()["num_free_blocks"] == engine.stats()["num_total_blocks"]
