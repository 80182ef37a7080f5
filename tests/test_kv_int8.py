"""kv_cache_dtype="int8": the cache rows (values quantized per token and KV head, the fp32 scale in the row), paged
attention over them against the reference composite, and the engine against the float32 goldens."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from cogvlm2.runtime import configure_mindspore

configure_mindspore()

from mindspore import Parameter, Tensor  # noqa: E402

from conftest import assert_close_to_goldens, demo_answers  # noqa: E402
from cogvlm2.rope import default_inv_freq, rope_table  # noqa: E402
from kernels.quantization import dequantize, quantize_int8  # noqa: E402
from kernels.reference import INT8_KV_SCALE_BYTES, make_paged_batch  # noqa: E402
from kernels.registry import get_kernels, pad_block_tables  # noqa: E402
from test_kernels import aot_paged_arrays, call_aot, portable_library  # noqa: E402,F401  (a fixture)

try:
    CPU = get_kernels("cpu")
except Exception:  # noqa: BLE001
    CPU = None
needs_cpu = pytest.mark.skipif(CPU is None, reason="CPU kernel library not built")
REF = get_kernels("reference")
# the bfloat16 rule of the dtype issue: max abs logit error, min cosine, reference top-2 margin
BF16_RULE = (0.25, 0.9999, 0.05)


def normal(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def int8_rows(values: np.ndarray) -> np.ndarray:
    """[S, KV, d] fp32 -> the int8 cache rows [S, KV, d + 4] (quantize_int8 per token and head, then the scale)."""
    s, kv, d = values.shape
    q, scales = quantize_int8(values.reshape(s * kv, d))
    return np.concatenate([q, scales.reshape(-1, 1).view(np.int8)], axis=1).reshape(s, kv, d + INT8_KV_SCALE_BYTES)


def read_rows(rows: np.ndarray) -> np.ndarray:
    d = rows.shape[-1] - INT8_KV_SCALE_BYTES
    return rows[..., :d].astype(np.float32) * np.ascontiguousarray(rows[..., d:]).view(np.float32)


def int8_cache(values: np.ndarray, name: str) -> Parameter:
    return Parameter(Tensor.from_numpy(int8_rows(values)), name=name, requires_grad=False)


def test_rows_hold_round_to_nearest_values_and_their_scale():
    values = normal(np.random.default_rng(0), 6, 2, 40) * np.float32(3)
    values[1, 0] = 0  # an all-zero row: scale 1
    rows = int8_rows(values)
    assert rows.dtype == np.int8 and rows.shape == (6, 2, 44)
    scales = np.ascontiguousarray(rows[..., 40:]).view(np.float32)[..., 0]
    assert scales[1, 0] == 1 and not rows[1, 0, :40].any()
    np.testing.assert_allclose(scales[0, 0], np.abs(values[0, 0]).max() / 127, rtol=1e-7)
    assert np.all(np.abs(read_rows(rows) - values) <= scales[..., None] / 2 * (1 + 1e-6))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_write_kv_quantizes_each_token_and_head(backend):
    if backend == "cpu" and CPU is None:
        pytest.skip("CPU kernel library not built")
    kernels = CPU if backend == "cpu" else REF
    rng = np.random.default_rng(1)
    values = normal(rng, 7, 2, 24) * np.float32(5)
    cache = int8_cache(np.zeros((12, 2, 24), np.float32), "c")
    slots = np.array([3, 0, 11, 5, 6, 2, 9], np.int32)
    kernels.write_kv(cache, Tensor(slots), Tensor(values))
    written = cache.asnumpy()
    np.testing.assert_array_equal(written[slots], int8_rows(values))
    untouched = np.setdiff1d(np.arange(12), slots)
    np.testing.assert_array_equal(written[untouched], int8_rows(np.zeros((12, 2, 24), np.float32))[untouched])


def run_paged(kernels, qkv: np.ndarray, kv: int, key0: np.ndarray, value0: np.ndarray, batch, rope, fused: bool):
    caches = [int8_cache(key0, "k"), int8_cache(value0, "v")]
    heads = qkv.shape[1] - 2 * kv
    meta = (batch.slot_mapping, batch.seq_index, batch.token_position, pad_block_tables(batch.block_tables),
            batch.context_lens, batch.block_size)
    if fused:
        out = kernels.paged_attention(Tensor(qkv.copy()), None, None, *caches, *meta, rope=rope)
    else:
        q, k, v = (Tensor(np.ascontiguousarray(part)) for part in
                   (qkv[:, :heads], qkv[:, heads:heads + kv], qkv[:, heads + kv:]))
        out = kernels.paged_attention(q, k, v, *caches, *meta, rope=rope)
    return out.asnumpy(), caches[0].asnumpy(), caches[1].asnumpy()


def check_paged(heads_per_kv: int, kv: int, d: int, block_size: int, lens: list[int], new: list[int], fused: bool,
                rope: bool, seed: int) -> None:
    """Kernel vs reference: the same cache bytes (this step's rows quantized), outputs within fp32 rounding; the
    output also equals attention over the dequantized caches."""
    rng = np.random.default_rng(seed)
    batch = make_paged_batch(lens, new, block_size, rng, shuffle=True)
    n, heads = len(batch.seq_index), heads_per_kv * kv
    qkv = normal(rng, n, heads + 2 * kv, d)
    key0, value0 = normal(rng, batch.num_slots, kv, d), normal(rng, batch.num_slots, kv, d)
    rope_args = None
    if rope:
        cos, sin = rope_table(default_inv_freq(d, 10000.0), 512)
        rope_args = (Tensor(rng.integers(0, 512, n).astype(np.int32)), Tensor(cos), Tensor(sin))
    out, keys, values = run_paged(CPU, qkv, kv, key0, value0, batch, rope_args, fused)
    ref_out, ref_keys, ref_values = run_paged(REF, qkv, kv, key0, value0, batch, rope_args, fused)
    np.testing.assert_array_equal(keys, ref_keys)
    np.testing.assert_array_equal(values, ref_values)
    if not rope:
        np.testing.assert_array_equal(values[batch.slot_mapping], int8_rows(qkv[:, heads + kv:]))
    scale = float(np.abs(ref_out).max())
    assert float(np.abs(out - ref_out).max()) <= 1e-5 * scale


@needs_cpu
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("fused,rope", [(False, False), (True, True)], ids=["split", "fused-rope"])
@pytest.mark.parametrize("heads_per_kv,d", [(4, 64), (1, 128), (3, 112), (12, 64), (2, 40)])
def test_paged_attention_over_an_int8_cache_matches_the_reference(block_size, fused, rope, heads_per_kv, d):
    """Decodes, a first chunk and a chunk from mid-block; the decode fast path (few heads per KV head), the
    transposed scores (12 rows) and a head_dim off the 16-lane vectors."""
    check_paged(heads_per_kv, 2, d, block_size, [9, 30, 12, 26], [1, 1, 12, 19], fused, rope,
                seed=block_size + heads_per_kv + d)


@needs_cpu
def test_paged_attention_over_a_long_int8_context():
    check_paged(4, 2, 128, 16, [2048, 700], [1, 45], fused=True, rope=True, seed=3)


@needs_cpu
def test_portable_build_reads_int8_caches_as_the_native_one(portable_library):
    """The plain-loop build (no AVX-512) quantizes to the same bytes and attends to the same values."""
    from kernels.library import load_library
    batch = make_paged_batch([9, 30, 12, 26], [1, 1, 12, 19], 16, np.random.default_rng(5), shuffle=True)
    inputs = aot_paged_arrays(np.random.default_rng(8), "float32", 8, 2, 64, batch)
    inputs[3], inputs[4] = int8_rows(inputs[3]), int8_rows(inputs[4])
    results = []
    for library in (ctypes.CDLL(load_library().path), portable_library):
        arrays = [a.copy() for a in inputs]
        assert call_aot(library, "PagedAttention", arrays) == 0
        results.append(arrays)
    native, portable = results
    np.testing.assert_array_equal(portable[3], native[3])
    np.testing.assert_array_equal(portable[4], native[4])
    np.testing.assert_allclose(portable[14], native[14], rtol=1e-5, atol=1e-5)


def test_int8_cache_holds_about_four_times_the_float32_tokens():
    from engine.llm_engine import LLMEngine
    float32 = LLMEngine("demo", dtype="float32", kv_cache_memory_gb=0.01).stats()
    int8 = LLMEngine("demo", dtype="bfloat16", kv_cache_dtype="int8", kv_cache_memory_gb=0.01).stats()
    assert int8["kv_cache_dtype"] == "int8"
    # the demo's head_dim is 16: each 16-byte row carries a 4-byte scale, so 64 / 20 = 3.2x
    ratio = int8["num_total_blocks"] / float32["num_total_blocks"]
    assert ratio == pytest.approx(4 * 16 / 20, rel=0.01)
    assert int8["kv_cache_bytes"] <= 0.01 * 2 ** 30


def test_int8_kv_with_bf16_compute_keeps_the_bf16_rule(golden_cases, golden_arrays, goldens):
    from engine import LLM
    from engine.llm_engine import LLMEngine
    engine = LLMEngine("demo", dtype="bfloat16", kv_cache_dtype="int8")
    cache = engine.executor.runner.kv_cache.keys[0]
    assert cache.asnumpy().dtype == np.int8 and cache.shape[-1] == 16 + INT8_KV_SCALE_BYTES
    max_abs, min_cosine, margin = BF16_RULE
    assert_close_to_goldens(engine, golden_cases, golden_arrays, max_abs=max_abs, min_cosine=min_cosine,
                            margin=margin)
    exact = demo_answers(LLM("demo", dtype="bfloat16", kv_cache_dtype="int8"), goldens)
    assert all(exact), exact
