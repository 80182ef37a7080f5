"""dtype and kv_cache_dtype (cogvlm2/precision.py): the rules, and bfloat16 against the float32 goldens."""
from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import pytest

from cogvlm2.config import CogVLM2Config
from cogvlm2.precision import NUMPY_DTYPES, resolve_precision
from conftest import assert_close_to_goldens, demo_answers

BF16, FP16, FP32 = np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16), np.dtype(np.float32)
BF16_MARGIN = 0.05  # greedy tokens must agree up to the first reference top-2 margin below this


def test_auto_is_bfloat16_for_a_bf16_checkpoint_on_a_bf16_cpu_else_float32():
    config = CogVLM2Config()
    assert resolve_precision("auto", "auto", config, BF16, cpu_has_bf16_dot=True) == \
        resolve_precision("bfloat16", "auto", config, BF16, True)
    assert resolve_precision("auto", "auto", config, BF16, cpu_has_bf16_dot=False).compute == "float32"
    assert resolve_precision("auto", "auto", config, FP32, cpu_has_bf16_dot=True).compute == "float32"
    yaml_float32 = dataclasses.replace(config, compute_dtype="float32")  # a MindFormers yaml's compute_dtype wins
    assert resolve_precision("auto", "auto", yaml_float32, BF16, cpu_has_bf16_dot=True).compute == "float32"


def test_float32_keeps_16_bit_weights_as_stored_and_kv_follows_the_compute_dtype():
    config = CogVLM2Config()
    assert resolve_precision("float32", "auto", config, BF16, True).weights == BF16
    assert resolve_precision("float32", "auto", config, FP16, True).weights == FP16
    assert resolve_precision("float32", "auto", config, FP32, True).weights == FP32
    p = resolve_precision("bfloat16", "auto", config, FP32, True)
    assert (p.weights, p.kv_cache, p.kv_bytes) == (BF16, "bfloat16", 2)
    p = resolve_precision("float16", "float32", config, BF16, True)
    assert (p.weights, p.kv_cache, p.kv_bytes) == (FP16, "float32", 4)


@pytest.mark.parametrize("field, value", [("dtype", "fp8"), ("kv_cache_dtype", "int4")])
def test_unknown_dtypes_name_their_field(field, value):
    kwargs = {"dtype": "auto", "kv_cache_dtype": "auto", field: value}
    with pytest.raises(ValueError, match=field):
        resolve_precision(kwargs["dtype"], kwargs["kv_cache_dtype"], CogVLM2Config(), BF16, True)


@pytest.fixture(scope="module")
def bf16_engine():
    from engine.llm_engine import LLMEngine
    return LLMEngine("demo", dtype="bfloat16")


def test_bfloat16_logits_and_greedy_tokens_against_the_float32_goldens(bf16_engine, golden_cases, golden_arrays):
    assert bf16_engine.stats()["dtype"] == "bfloat16" and bf16_engine.stats()["kv_cache_dtype"] == "bfloat16"
    assert_close_to_goldens(bf16_engine, golden_cases, golden_arrays, max_abs=0.25, min_cosine=0.9999,
                            margin=BF16_MARGIN)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_demo_answers_are_exact_in_16_bit(goldens, dtype):
    from engine import LLM
    exact = demo_answers(LLM("demo", dtype=dtype), goldens)
    if dtype == "bfloat16":
        assert all(exact), exact
    else:  # float16 is the 310P's dtype; the issue's exactness rule is bf16's: report, require most
        assert sum(exact) >= len(exact) - 2, exact


def test_float32_on_a_bf16_checkpoint_holds_bf16_weights_and_bf16_kv_holds_twice_the_tokens():
    from engine import LLM
    f32 = LLM("demo", dtype="float32", kv_cache_memory_gb=0.01)
    bf16 = LLM("demo", dtype="bfloat16", kv_cache_memory_gb=0.01)
    model = f32.engine.executor.runner.model
    assert model.language.layers[0].language_qkv.dtype == NUMPY_DTYPES["bfloat16"] or \
        str(model.language.layers[0].language_qkv.dtype) == "BFloat16"
    assert model.language.embed_table.dtype == BF16
    blocks = bf16.stats()["num_total_blocks"], f32.stats()["num_total_blocks"]
    assert 2 * blocks[1] <= blocks[0] <= 2 * blocks[1] + 1  # the same budget, floored to whole blocks
    block_bytes = [s["kv_cache_bytes"] // s["num_total_blocks"] for s in (bf16.stats(), f32.stats())]
    assert 2 * block_bytes[0] == block_bytes[1]
