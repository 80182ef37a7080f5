"""The engine against the goldens: batching, shuffling, late arrivals, preemption, chunking, prefix caching."""
from __future__ import annotations

import random

import pytest

from conftest import TINY, assert_golden, assert_no_leak, golden_prompt, greedy_params
from engine import LLM, SamplingParams
from engine.llm_engine import LLMEngine
from engine.outputs import accumulate


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def llm(request):
    """Both dtypes: float32 keeps the bf16 weights as stored and computes exactly; bfloat16 rounds GEMM inputs and
    caches K/V in bf16 (the fixture keeps its greedy tokens either way)."""
    engine = LLM("demo", seed=0, dtype=request.param)
    yield engine
    assert_no_leak(engine)


def test_all_cases_together_in_shuffled_orders(llm, golden_cases):
    for seed in (0, 1, 2):
        cases = golden_cases[:]
        random.Random(seed).shuffle(cases)
        outs = llm.generate([golden_prompt(c) for c in cases], [greedy_params(c) for c in cases], use_tqdm=False)
        for case, out in zip(cases, outs):
            assert out.error is None
            assert out.finished and out.outputs[0].finish_reason == "length"
            assert out.prompt_token_ids == case["input_ids"]
            assert_golden(case, out.outputs[0].token_ids)
        assert_no_leak(llm)


def test_requests_added_while_others_decode(golden_cases):
    engine = LLMEngine("demo")
    outputs, finished = {}, {}
    pending = list(golden_cases)
    step = 0
    while pending or engine.has_unfinished_requests():
        if pending and step % 3 == 0:  # a new request every third step, joining running decodes
            case = pending.pop(0)
            engine.add_request(case["name"], golden_prompt(case), greedy_params(case))
        for delta in engine.step():
            out = accumulate(outputs, delta)
            if out.finished:
                finished[out.request_id] = out
        step += 1
    assert set(finished) == {c["name"] for c in golden_cases}
    for case in golden_cases:
        assert_golden(case, finished[case["name"]].outputs[0].token_ids)
    assert_no_leak(engine)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_pool_small_blocks_and_chunks_still_exact(golden_cases, goldens, dtype):
    tokens_per_image = goldens["vision_tokens_per_image"]
    chunk = 8
    assert chunk < tokens_per_image
    llm = LLM("demo", block_size=4, num_kv_blocks=48, max_num_batched_tokens=chunk, max_num_seqs=8, dtype=dtype)
    outs = llm.generate([golden_prompt(c) for c in golden_cases], [greedy_params(c) for c in golden_cases], use_tqdm=False)
    for case, out in zip(golden_cases, outs):
        assert out.error is None, out.error
        assert_golden(case, out.outputs[0].token_ids)
    stats = llm.stats()
    assert stats["num_preemptions"] > 0, stats
    assert stats["num_prefill_chunks"] > 0, stats
    assert_no_leak(llm)


def test_prefix_cache_hits_same_image_and_prompt(llm):
    prompt = {"prompt": "Describe the image.", "image": str(TINY / "demo_1.png")}
    params = SamplingParams(temperature=0, max_tokens=12)
    first = llm.generate(prompt, params, use_tqdm=False)[0]
    hits_before = llm.stats()["prefix_cache_hit_tokens"]
    second = llm.generate(prompt, params, use_tqdm=False)[0]
    assert llm.stats()["prefix_cache_hit_tokens"] > hits_before
    assert second.num_cached_tokens > 0
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    assert_no_leak(llm)


def test_same_placeholders_different_image_do_not_hit(llm, goldens):
    params = SamplingParams(temperature=0, max_tokens=24)
    by_image = {ex["image"]: ex for ex in goldens["demo"]["examples"] if ex["prompt"] == "Describe the image."}
    first = llm.generate({"prompt": "Describe the image.", "image": str(TINY / "demo_2.png")}, params,
                         use_tqdm=False)[0]
    hits_before = llm.stats()["prefix_cache_hit_tokens"]
    other = llm.generate({"prompt": "Describe the image.", "image": str(TINY / "demo_3.png")}, params,
                         use_tqdm=False)[0]
    assert other.prompt_token_ids == first.prompt_token_ids  # identical ids, different pictures
    assert other.num_cached_tokens == 0
    assert llm.stats()["prefix_cache_hit_tokens"] == hits_before
    assert first.outputs[0].token_ids == by_image["demo_2.png"]["token_ids"]
    assert other.outputs[0].token_ids == by_image["demo_3.png"]["token_ids"]


def test_demo_examples_through_engine(llm, goldens):
    examples = goldens["demo"]["examples"]
    prompts = [{"prompt": ex["prompt"], "template": ex["template"],
                **({"image": str(TINY / ex["image"])} if ex["image"] else {})} for ex in examples]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    for ex, out in zip(examples, outs):
        assert out.outputs[0].token_ids == ex["token_ids"], ex
        assert out.outputs[0].text == ex["text"]
        assert out.outputs[0].finish_reason == ex["finish_reason"]


def test_vision_encoder_runs_once_per_image():
    llm = LLM("demo", enable_prefix_caching=False)
    image = str(TINY / "demo_4.png")
    prompts = [{"prompt": q, "image": image} for q in ("How many shapes are there?", "Describe the image.",
                                                       "What colour is the background?")]
    prompts.append({"prompt": "Describe the image.", "image": str(TINY / "demo_5.png")})
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert all(o.error is None for o in outs)
    assert llm.stats()["num_images_encoded"] == 2


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_goldens_with_each_kernel_backend(golden_cases, backend):
    """Both kernel paths stay tested end to end: the CPU AOT kernels and the reference composites."""
    llm = LLM("demo", kernels=backend, block_size=4, max_num_batched_tokens=16)
    assert llm.stats()["kernels"] == backend
    outs = llm.generate([golden_prompt(c) for c in golden_cases], [greedy_params(c) for c in golden_cases], use_tqdm=False)
    for case, out in zip(golden_cases, outs):
        assert_golden(case, out.outputs[0].token_ids)
    assert llm.stats()["num_prefill_chunks"] > 0  # chunks that split image spans went through the kernels too
    assert_no_leak(llm)

