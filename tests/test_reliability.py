"""No request can hurt another: the findings of the attack on `cogvlm2 serve` reproduced at the engine level (the
HTTP ones are in test_server.py), admission as one step that admits a request completely or fails it alone, the
sampler on extreme valid values, and bounded image decoding."""
from __future__ import annotations

import io
import logging
import threading
import time

import numpy as np
import pytest
from PIL import Image

from conftest import TINY, assert_no_leak
from cogvlm2.image import DecodeBudget, load_image, preprocess_image
from engine import LLM, SamplingParams

GOOD = ["Who are you?", {"prompt": "What shapes are in the image?", "image": str(TINY / "demo_0.png")}]


@pytest.fixture(scope="module")
def llm():
    with LLM("demo", max_model_len=512) as engine:
        yield engine


def _solo(llm, prompt, params) -> list[int]:
    return llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids


def _fails_alone(llm, bad_params, field: str) -> None:
    """bad_params between two good requests: it fails naming `field`, the others equal their solo runs."""
    good = SamplingParams(temperature=0, max_tokens=6)
    alone = [_solo(llm, p, good) for p in GOOD]
    outs = llm.generate([GOOD[0], GOOD[0], GOOD[1]], [good, bad_params, good], use_tqdm=False)
    assert outs[1].outputs[0].finish_reason == "error" and field in outs[1].error, outs[1].error
    assert [outs[0].outputs[0].token_ids, outs[2].outputs[0].token_ids] == alone
    assert not llm.engine.requests and not llm.engine.has_unfinished_requests()
    assert_no_leak(llm)


def test_a_negative_seed_fails_alone_naming_the_field(llm):
    with pytest.raises(ValueError, match="^seed must be an int >= 0"):
        SamplingParams(seed=-1)
    _fails_alone(llm, {"seed": -1, "max_tokens": 4}, "seed")


def test_unreachable_min_tokens_fail_alone_naming_the_field(llm):
    _fails_alone(llm, {"min_tokens": 10 ** 6, "max_tokens": None}, "min_tokens")


def test_numbers_beyond_float32_name_their_field():
    for field, value in [("temperature", 1e300), ("temperature", 10 ** 400), ("top_p", -1e39),
                         ("repetition_penalty", 1e-300), ("presence_penalty", float("nan"))]:
        with pytest.raises(ValueError, match=f"^{field} "):
            SamplingParams(**{field: value})


def test_an_unexpected_error_while_admitting_fails_that_request_alone(llm, monkeypatch, caplog):
    """Not an input error (a bug, say): the request fails with a generic message and its id, the traceback goes to
    the log, and the batch is served."""
    process = llm.engine._process

    def flaky(prompt):
        if prompt == "explode":
            raise KeyError("internal detail")
        return process(prompt)

    monkeypatch.setattr(llm.engine, "_process", flaky)
    good = SamplingParams(temperature=0, max_tokens=6)
    with caplog.at_level(logging.ERROR, logger="engine.llm_engine"):
        outs = llm.generate([GOOD[0], "explode", GOOD[1]], good, use_tqdm=False)
    failed = outs[1]
    assert failed.outputs[0].finish_reason == "error"
    assert failed.error.startswith("InternalError") and failed.request_id in failed.error
    assert "internal detail" not in failed.error and "internal detail" in caplog.text
    assert [o.outputs[0].finish_reason for o in (outs[0], outs[2])] == ["length", "length"]
    assert not llm.engine.requests


def test_a_generate_call_that_raises_leaves_none_of_its_requests_running(llm, monkeypatch):
    add = llm.engine.add_request
    calls = []

    def add_then_fail(request_id, prompt, params=None, arrival_time=None):
        calls.append(request_id)
        if len(calls) == 2:
            raise RuntimeError("the caller's bug")
        add(request_id, prompt, params, arrival_time)

    monkeypatch.setattr(llm.engine, "add_request", add_then_fail)
    with pytest.raises(RuntimeError, match="the caller's bug"):
        llm.generate([GOOD[0], GOOD[0], GOOD[0]], SamplingParams(max_tokens=4), use_tqdm=False)
    monkeypatch.undo()
    assert not llm.engine.requests and llm.engine.scheduler.num_running == 0
    out = llm.generate(GOOD[0], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    assert out[0].outputs[0].finish_reason == "length"
    assert_no_leak(llm)


@pytest.mark.parametrize("params", [
    {"repetition_penalty": 1.2e-38, "temperature": 1.0},  # seen tokens' positive logits overflow to +inf
    {"repetition_penalty": 3e38, "temperature": 0.5, "top_k": 5},  # negative ones to -inf
    {"temperature": 1e-5 * 1.01, "top_p": 0.5},  # the smallest sampling temperature
], ids=["tiny-penalty", "huge-penalty", "tiny-temperature"])
def test_extreme_valid_values_sample_without_failing_the_batch(llm, params):
    good = SamplingParams(temperature=0, max_tokens=6)
    expected = _solo(llm, GOOD[0], good)
    outs = llm.generate([GOOD[0], GOOD[0]], [good, SamplingParams(max_tokens=6, seed=1, **params)], use_tqdm=False)
    assert outs[0].outputs[0].token_ids == expected
    assert outs[1].error is None and len(outs[1].outputs[0].token_ids) == 6


# ---- images ------------------------------------------------------------------------------------------------------
def _encoded(width: int, height: int, fmt: str, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (height // 100, width // 100, 3), dtype=np.uint8)  # shapes ~ a tenth of a side
    img = Image.fromarray(pixels).resize((width, height), Image.Resampling.BILINEAR).convert(mode)
    buffer = io.BytesIO()
    img.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt,mode", [("PNG", "RGB"), ("JPEG", "RGB"), ("PNG", "P"), ("PNG", "LA")])
def test_large_images_are_decoded_toward_the_model_size(fmt, mode):
    """A 2000-pixel picture for a 112-pixel model comes back reduced (at least 2x the target each way), and the
    model's input is close to the one from the full decode."""
    data = _encoded(2000, 1600, fmt, mode)
    reduced = load_image(data, target_size=112)
    full = load_image(data)
    assert reduced.mode == "RGB" and full.size == (2000, 1600)
    assert 224 <= min(reduced.size) < 2 * 224 + 224 and reduced.size[0] < 2000
    difference = np.abs(preprocess_image(reduced, 112) - preprocess_image(full, 112))
    assert float(difference.mean()) < 0.05, float(difference.mean())  # in CLIP-normalised units (~ 1/4 of a level)


def test_small_images_are_decoded_as_they_are():
    data = _encoded(300, 200, "PNG")
    assert load_image(data, target_size=112).size == (300, 200)


def test_the_decode_budget_bounds_concurrent_decodes():
    budget = DecodeBudget(limit_bytes=100)
    active, peak, lock = [0], [0], threading.Lock()

    def decode(nbytes: int) -> None:
        with budget.reserve(nbytes):
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            time.sleep(0.02)
            with lock:
                active[0] -= 1

    threads = [threading.Thread(target=decode, args=(40,)) for _ in range(8)]
    threads.append(threading.Thread(target=decode, args=(500,)))  # larger than the budget: runs alone
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads)
    assert peak[0] == 2  # 40 + 40 <= 100 < 3 x 40
