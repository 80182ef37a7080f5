"""quantization="w8a16" (kernels/quantization.py): the int8 weights, the int8 panel GEMM against its reference, and
the engine against the float32 goldens (the rule of the quantization issue)."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from cogvlm2.runtime import configure_mindspore

configure_mindspore()

from mindspore import Tensor  # noqa: E402
from mindspore import dtype as mstype  # noqa: E402

from conftest import TINY, assert_close_to_goldens, demo_answers  # noqa: E402
from kernels.quantization import QuantizedWeight, dequantize, quantize_int8  # noqa: E402
from kernels.registry import get_kernels  # noqa: E402

# (dtype, max abs logit error, min cosine, margin): greedy tokens must agree up to the first reference top-2 margin
# below `margin`. float32 math over int8 weights has the quantization issue's w8a16 rule; bfloat16 adds the bf16
# rounding of the activations and meets its looser w8a8 rule (measured: image_history moves at a margin of 0.236).
RULES = {"float32": (0.5, 0.9995, 0.1), "bfloat16": (1.0, 0.999, 0.3)}
W8A16_MARGIN = RULES["float32"][2]


def test_int8_round_to_nearest_per_output_channel():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 40)).astype(np.float32) * np.array([[1e-3], [1], [30], [0.5], [0]], np.float32)
    q, scales = quantize_int8(w)
    assert q.dtype == np.int8 and scales.dtype == np.float32 and scales.shape == (5,)
    assert np.abs(q[:4]).max(axis=1).tolist() == [127] * 4  # each channel's largest weight maps to +-127
    assert scales[4] == 1 and not q[4].any()  # an all-zero channel
    assert np.all(np.abs(dequantize(q, scales) - w) <= scales[:, None] / 2 * (1 + 1e-6))


@pytest.mark.parametrize("compute,portable", [("float32", False), ("bfloat16", False), ("bfloat16", True)])
@pytest.mark.parametrize("n,num_language", [(1, 1), (9, 4), (70, 0), (300, 131)])
@pytest.mark.parametrize("inner", [160, 77])  # 77: an odd k, paired with zeros in the bf16 products
def test_int8_panels_match_the_dequantized_reference(monkeypatch, compute, portable, n, num_language, inner):
    """The int8 panel GEMM = the products over q * scale (bfloat16: x rounded to bf16, q exact in bf16; also the
    portable fallback of vdpbf16ps), routed, with the vision bias and with a residual."""
    from kernels.registry import BF16_FALLBACK_ENV, CpuKernels
    from kernels.sku import load_params
    monkeypatch.setenv(BF16_FALLBACK_ENV, "1" if portable else "0")
    cpu = CpuKernels(load_params(), compute_dtype=compute, quantization="w8a16")
    ref = get_kernels("reference", compute_dtype=compute, quantization="w8a16")
    rng = np.random.default_rng(n)
    wl, wv = (rng.standard_normal((96, inner)).astype(np.float32) for _ in range(2))
    x, bias, residual = (Tensor(rng.standard_normal(s).astype(np.float32)) for s in ((n, inner), (96,), (n, 96)))
    pl, pv = cpu.prepare_weight(wl), cpu.prepare_weight(wv)
    assert isinstance(pl, QuantizedWeight) and pl.values.dtype == mstype.int8 and pl.values.shape == (3, inner, 32)
    rl, rv = ref.prepare_weight(wl), ref.prepare_weight(wv)
    expected = ref.expert_linear(x, num_language, rl, rv, bias).asnumpy()
    xs = x.asnumpy() if compute == "float32" else x.asnumpy().astype(ml_dtypes.bfloat16).astype(np.float32)
    direct = xs[:num_language] @ dequantize(*quantize_int8(wl)).T
    np.testing.assert_allclose(expected[:num_language], direct, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(cpu.expert_linear(x, num_language, pl, pv, bias).asnumpy(), expected, rtol=1e-5,
                               atol=1e-4)
    with_residual = cpu.expert_linear(x, num_language, pl, pv, None, residual=residual).asnumpy()
    np.testing.assert_allclose(with_residual, ref.expert_linear(x, num_language, rl, rv, None).asnumpy()
                               + residual.asnumpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(cpu.linear(x, pl).asnumpy(), xs @ dequantize(*quantize_int8(wl)).T, rtol=1e-5,
                               atol=1e-4)


def test_rows_not_in_whole_panels_take_the_dequantized_composite():
    cpu = get_kernels("cpu", quantization="w8a16")
    w = np.random.default_rng(1).standard_normal((40, 24)).astype(np.float32)  # 40 rows: not a multiple of 32
    prepared = cpu.prepare_weight(w)
    assert prepared.values.shape == (40, 24)
    x = Tensor(np.ones((2, 24), np.float32))
    np.testing.assert_allclose(cpu.linear(x, prepared).asnumpy(), np.ones((2, 24)) @ dequantize(*quantize_int8(w)).T,
                               rtol=1e-5, atol=1e-5)


def test_unknown_quantization_names_its_field():
    from engine.config import EngineArgs
    with pytest.raises(ValueError, match="quantization"):
        EngineArgs(quantization="int4")
    with pytest.raises(ValueError, match="quantization"):
        get_kernels("cpu", quantization="w4a16")


@pytest.mark.parametrize("dtype", list(RULES))
def test_w8a16_logits_and_greedy_tokens_against_the_float32_goldens(dtype, golden_cases, golden_arrays):
    from engine.llm_engine import LLMEngine
    engine = LLMEngine("demo", dtype=dtype, quantization="w8a16")
    assert engine.stats()["quantization"] == "w8a16" and engine.stats()["dtype"] == dtype
    layer = engine.executor.runner.model.language.layers[0]
    assert layer.language_qkv.values.dtype == mstype.int8  # held as int8, no 16- or 32-bit copy
    max_abs, min_cosine, margin = RULES[dtype]
    assert_close_to_goldens(engine, golden_cases, golden_arrays, max_abs=max_abs, min_cosine=min_cosine,
                            margin=margin)


@pytest.mark.parametrize("dtype", list(RULES))
def test_w8a16_demo_answers_are_exact_but_at_near_ties(goldens, dtype):
    """Every demo answer exact, except where the float32 answer's top-2 logprob margin at the first differing token
    is below W8A16_MARGIN (measured: 40 of 41 exact; "Describe the image." of demo_1 lists two shapes in the other
    order, at a float32 margin of 0.05)."""
    from engine import LLM, SamplingParams
    exact = demo_answers(LLM("demo", dtype=dtype, quantization="w8a16"), goldens)
    assert sum(exact) >= len(exact) - 2, exact
    examples = [ex for ex, ok in zip(goldens["demo"]["examples"], exact) if not ok]
    reference = LLM("demo", dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=24, logprobs=2)
    quantized = LLM("demo", dtype=dtype, quantization="w8a16")
    for ex in examples:
        prompt = {"prompt": ex["prompt"], "template": ex["template"],
                  **({"image": str(TINY / ex["image"])} if ex["image"] else {})}
        want = reference.generate(prompt, params, use_tqdm=False)[0].outputs[0]
        got = quantized.generate(prompt, params, use_tqdm=False)[0].outputs[0]
        step = next(i for i, (a, b) in enumerate(zip(want.token_ids, got.token_ids)) if a != b)
        top2 = sorted(want.logprobs[step].values(), reverse=True)[:2]  # {token id: logprob}
        assert top2[0] - top2[1] < W8A16_MARGIN, (ex["prompt"], ex["image"], step, top2)


def test_text_only_serving_skips_the_vision_tower_and_rejects_images():
    """limit_mm_per_prompt={"image": 0}: no vision tensor read, text answers as with the tower, an image request
    fails alone with ImagesDisabledError naming the setting while the others are served."""
    from engine import LLM, SamplingParams
    params = SamplingParams(temperature=0, max_tokens=8)
    with_tower = LLM("demo").generate("What is a circle?", params, use_tqdm=False)[0].outputs[0].text
    llm = LLM("demo", limit_mm_per_prompt={"image": 0})
    assert llm.engine.executor.runner.model.vision is None
    assert llm.stats()["limit_mm_per_prompt"] == {"image": 0}
    image = {"prompt": "Describe the image.", "image": str(TINY / "demo_0.png")}
    failed, served = llm.generate([image, "What is a circle?"], params, use_tqdm=False)
    assert failed.outputs[0].finish_reason == "error"
    assert failed.error.startswith("ImagesDisabledError") and "limit_mm_per_prompt" in failed.error
    assert served.outputs[0].text == with_tower


@pytest.mark.parametrize("limits, message", [({"image": 2}, "0 or 1"), ({"video": 0}, "modality"),
                                             ({"image": -1}, "0 or 1")])
def test_bad_mm_limits_name_the_setting(limits, message):
    from engine.config import EngineArgs
    with pytest.raises(ValueError, match=message):
        EngineArgs(limit_mm_per_prompt=limits)


def test_mm_limits_from_the_command_line():
    import argparse

    from engine.config import add_cli_args, engine_kwargs
    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    assert engine_kwargs(parser.parse_args(["--limit-mm-per-prompt", "image=0"]))["limit_mm_per_prompt"] == {"image": 0}
    assert engine_kwargs(parser.parse_args(["--limit-mm-per-prompt", '{"image": 1}']))["limit_mm_per_prompt"] == \
        {"image": 1}
