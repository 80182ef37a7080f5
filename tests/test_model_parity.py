"""The MindSpore model against the reference implementation's goldens (tests/fixtures/README.md)."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import TINY, case_image, margin_limit
from kernels.registry import get_kernels


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def processed(demo_pipeline, golden_cases):
    return {c["name"]: demo_pipeline.processor(c["query"], image=case_image(c), history=c["history"],
                                                template=c["template"]) for c in golden_cases}


def test_vision_features_match(demo_pipeline, golden_cases, golden_arrays, processed):
    cases = [c for c in golden_cases if c["image"]]
    assert cases
    for case in cases:
        p = processed[case["name"]]
        np.testing.assert_allclose(p.pixel_values, golden_arrays[f"{case['name']}.pixel_values"], atol=1e-5)
        features = demo_pipeline.generator.model.encode_images(p.pixel_values[None]).asnumpy()[0]
        np.testing.assert_allclose(features, golden_arrays[f"{case['name']}.vision_features"], atol=1e-4)


@pytest.mark.skipif(get_kernels("auto").backend != "cpu", reason="the CPU kernel library did not build")
def test_vision_features_match_with_cpu_kernels(golden_cases, golden_arrays, processed):
    """The engine's vision encoder: prepacked weights, bias fused into the kernel GEMM."""
    from cogvlm2.model import CogVLM2Model
    from cogvlm2.model_source import resolve_model
    model = CogVLM2Model.from_source(resolve_model("demo"), get_kernels("cpu"))
    assert model.vision.layers[0].qkv_w.ndim == 3  # the prepacked layout is what runs here
    for case in [c for c in golden_cases if c["image"]]:
        features = model.encode_images(processed[case["name"]].pixel_values[None]).asnumpy()[0]
        np.testing.assert_allclose(features, golden_arrays[f"{case['name']}.vision_features"], atol=1e-4)


def test_vision_attention_in_head_groups_is_the_same_math(demo_pipeline, golden_cases, processed, monkeypatch):
    """A budget that fits one (image, head) pair's scores per call (the 19B's 1344x1344 images are cut so) gives the
    same features as one call over all heads."""
    import cogvlm2.vision as vision
    case = next(c for c in golden_cases if c["image"])
    pixels = processed[case["name"]].pixel_values[None]
    whole = demo_pipeline.generator.model.encode_images(pixels).asnumpy()
    tokens = demo_pipeline.generator.model.config.vision.grid_size ** 2 + 1
    monkeypatch.setattr(vision, "ATTENTION_SCORES_BUDGET", tokens * tokens * 4)
    grouped = demo_pipeline.generator.model.encode_images(pixels).asnumpy()
    np.testing.assert_allclose(grouped, whole, rtol=0, atol=1e-6)


def test_vision_mlp_in_token_chunks_is_the_same_math(demo_pipeline, golden_cases, processed, monkeypatch):
    """A budget of 7 tokens' fc1 activations per call (a 1344x1344 image's 9,217 tokens are cut so) gives the same
    features as one call over all tokens, to fp32 rounding (a BLAS's GEMM blocks by the row count)."""
    import cogvlm2.vision as vision
    case = next(c for c in golden_cases if c["image"])
    pixels = processed[case["name"]].pixel_values[None]
    model = demo_pipeline.generator.model
    whole = model.encode_images(pixels).asnumpy()
    monkeypatch.setattr(vision, "MLP_ACTIVATIONS_BUDGET", 7 * model.config.vision.intermediate_size * 4)
    chunked = model.encode_images(pixels).asnumpy()
    np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-5)


def test_prefill_logits_and_probe_logprobs(demo_pipeline, golden_cases, golden_arrays, processed):
    for case in golden_cases:
        name = case["name"]
        logits = demo_pipeline.generator.prefill_logits(processed[name], all_positions=True)
        assert logits.shape == (len(case["input_ids"]), 128256)
        np.testing.assert_allclose(logits[-1], golden_arrays[f"{name}.last_logits"], atol=2e-4, err_msg=name)
        probe = _log_softmax(logits)[:, golden_arrays[f"{name}.probe_ids"]]
        np.testing.assert_allclose(probe, golden_arrays[f"{name}.probe_logprobs"], atol=1e-3, err_msg=name)
        assert logits.argmax(-1).tolist() == case["argmax_per_position"], name


def test_greedy_tokens_match_goldens(demo_pipeline, golden_cases, processed):
    for case in golden_cases:
        expected = case["greedy_tokens"]
        result = demo_pipeline.generator.generate(processed[case["name"]], max_tokens=len(expected))
        limit = margin_limit(case["greedy_top2_margin"])
        assert limit > 0
        assert result.token_ids[:limit] == expected[:limit], case["name"]


def test_demo_examples_through_api(demo_pipeline, goldens):
    examples = goldens["demo"]["examples"]
    assert len(examples) >= 30
    for ex in examples:
        image = TINY / ex["image"] if ex["image"] else None
        out = demo_pipeline.generate(ex["prompt"], image=image, template=ex["template"], max_tokens=24)
        assert out.token_ids == ex["token_ids"], ex
        assert out.text == ex["text"]
        assert out.finish_reason == ex["finish_reason"]


def test_sampled_generation_is_seeded(demo_pipeline):
    kwargs = dict(image=TINY / "demo_0.png", max_tokens=8, temperature=1.0, ignore_eos=True)
    a = demo_pipeline.generate("Describe the image.", seed=3, **kwargs)
    b = demo_pipeline.generate("Describe the image.", seed=3, **kwargs)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 8
    assert a.finish_reason == "length"
