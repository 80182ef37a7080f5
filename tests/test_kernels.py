"""Parity of the CPU kernels with the reference composites, in-place semantics, use inside jit, and the registry."""
from __future__ import annotations

import ctypes
import inspect
import shutil
import subprocess
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from cogvlm2.runtime import configure_mindspore

configure_mindspore()

import mindspore as ms  # noqa: E402
from mindspore import Parameter, Tensor, ops  # noqa: E402

from cogvlm2.rope import BF16, default_inv_freq, rope_table  # noqa: E402
from kernels import registry, sku  # noqa: E402
from kernels.ascend import AscendKernels  # noqa: E402
from kernels.interface import KernelSet  # noqa: E402
from kernels.reference import make_paged_batch  # noqa: E402
from kernels.registry import CpuKernels, ReferenceKernels, get_kernels, pad_block_tables  # noqa: E402
from kernels.sku import load_params  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
RTOL = 1e-5

try:
    CPU = get_kernels("cpu")
except Exception as error:  # noqa: BLE001
    CPU = None
    CPU_ERROR = str(error)
needs_cpu = pytest.mark.skipif(CPU is None, reason="CPU kernel library not built")
REF = get_kernels("reference")


def assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float = RTOL) -> None:
    scale = max(float(np.abs(expected).max()), 1e-30)
    err = float(np.abs(actual - expected).max()) / scale
    assert err <= rtol, f"relative error {err:.3g} > {rtol}"


def normal(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------- paged attention (with the cache write)

CACHE_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def cache_parameter(values: np.ndarray, dtype: str = "float32", name: str = "cache") -> Parameter:
    """A KV cache of `dtype` holding values (rounded to it by numpy / ml_dtypes: to nearest even)."""
    array = np.ascontiguousarray(values.astype(CACHE_DTYPES[dtype]))
    return Parameter(Tensor.from_numpy(array), name=name, requires_grad=False)


def cache_bits(cache) -> np.ndarray:
    """A cache's contents as unsigned integers of its width, for bitwise comparisons."""
    array = cache.asnumpy() if isinstance(cache, Tensor) else cache
    return array.view({2: np.uint16, 4: np.uint32}[array.dtype.itemsize])


def run_paged(kernels, q, k, v, key0, value0, batch, as_tensors: bool = False, dtype: str = "float32"):
    key_cache = cache_parameter(key0, dtype, "key_cache")
    value_cache = cache_parameter(value0, dtype, "value_cache")
    tables = pad_block_tables(batch.block_tables) if as_tensors else batch.block_tables
    out = kernels.paged_attention(Tensor(q), Tensor(k), Tensor(v), key_cache, value_cache, batch.slot_mapping,
                                  batch.seq_index, batch.token_position, tables, batch.context_lens,
                                  batch.block_size)
    return out.asnumpy(), key_cache.asnumpy(), value_cache.asnumpy()


def check_paged(heads_per_kv: int, kv_heads: int, head_dim: int, block_size: int, context_lens: list[int],
                new_tokens: list[int], shuffle: bool, seed: int = 0, dtype: str = "float32") -> None:
    rng = np.random.default_rng(seed)
    batch = make_paged_batch(context_lens, new_tokens, block_size, rng, shuffle=shuffle)
    n, heads = len(batch.seq_index), heads_per_kv * kv_heads
    q, k, v = normal(rng, n, heads, head_dim), normal(rng, n, kv_heads, head_dim), normal(rng, n, kv_heads, head_dim)
    key0 = normal(rng, batch.num_slots, kv_heads, head_dim)
    value0 = normal(rng, batch.num_slots, kv_heads, head_dim)
    out, keys, values = run_paged(CPU, q, k, v, key0, value0, batch, as_tensors=True, dtype=dtype)
    ref_out, ref_keys, ref_values = run_paged(REF, q, k, v, key0, value0, batch, dtype=dtype)
    assert out.shape == (n, heads * head_dim)
    np.testing.assert_array_equal(cache_bits(keys), cache_bits(ref_keys))
    np.testing.assert_array_equal(cache_bits(values), cache_bits(ref_values))
    assert_close(out, ref_out)


@needs_cpu
@pytest.mark.parametrize("head_dim", [64, 112, 128])
@pytest.mark.parametrize("heads_per_kv", [1, 3, 4])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_paged_attention_mixed_batch(head_dim, heads_per_kv, block_size):
    # two decodes, a first chunk, and a chunk starting mid-block (position 7 with block 4/16)
    check_paged(heads_per_kv, 2, head_dim, block_size, [9, 30, 12, 26], [1, 1, 12, 19], shuffle=True,
                seed=head_dim + heads_per_kv + block_size)


@needs_cpu
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("context_lens,new_tokens", [
    ([5, 17, 33], [1, 1, 1]),            # decodes only (no prefill part)
    ([40], [40]),                        # one whole prompt (no decode part)
    ([23, 50], [23, 11]),                # prefills only, the second from mid-block
    ([1], [1]),                          # one token
    ([37], [1]),                         # a single decode
], ids=["decodes", "prompt", "chunks", "one-token", "one-decode"])
def test_paged_attention_batch_shapes(context_lens, new_tokens, shuffle):
    check_paged(4, 2, 64, 4, context_lens, new_tokens, shuffle)


@needs_cpu
@pytest.mark.parametrize("dtype", list(CACHE_DTYPES))
def test_paged_attention_long_context(dtype):
    check_paged(4, 2, 128, 16, [2048, 700], [1, 45], shuffle=True, dtype=dtype)


@needs_cpu
@pytest.mark.parametrize("dtype", list(CACHE_DTYPES))
@pytest.mark.parametrize("query_tile,key_tile", [(1, 16), (3, 40), (16, 128), (64, 32)])
def test_paged_attention_tiles(query_tile, key_tile, dtype):
    params = load_params(path="/nonexistent")
    for cls in ("decode", "prefill"):
        params.ops["paged_attention"][cls].update(query_tile=query_tile, key_tile=key_tile, threads=2,
                                                  parallel_min_work=0)
    global CPU
    saved, CPU = CPU, CpuKernels(params)
    try:
        check_paged(3, 2, 64, 4, [70, 9, 100], [70, 1, 37], shuffle=True, dtype=dtype)
    finally:
        CPU = saved


@needs_cpu
@pytest.mark.parametrize("table", ["fp32", "bf16"])
def test_paged_attention_with_fused_rope(table):
    """rope=(positions, cos, sin): q and k rotated inside the kernel, the cache holds the rotated K."""
    rng = np.random.default_rng(11)
    kv, heads, d = 2, 8, 128
    batch = make_paged_batch([30, 12, 7], [30, 5, 1], 4, rng, shuffle=True)
    n = len(batch.seq_index)
    inv_freq = default_inv_freq(d, 500000.0)
    cos, sin = rope_table(inv_freq.astype(BF16) if table == "bf16" else inv_freq, 4096)
    positions = rng.integers(0, 4096, n).astype(np.int32)  # position ids differ from token positions
    q, k, v = normal(rng, n, heads, d), normal(rng, n, kv, d), normal(rng, n, kv, d)
    key0, value0 = normal(rng, batch.num_slots, kv, d), normal(rng, batch.num_slots, kv, d)
    results = []
    for kernels in (CPU, REF):
        caches = [Parameter(Tensor(c.copy()), name=f"c{i}", requires_grad=False) for i, c in enumerate((key0, value0))]
        q_in, k_in = Tensor(q.copy()), Tensor(k.copy())
        out = kernels.paged_attention(q_in, k_in, Tensor(v), *caches, batch.slot_mapping, batch.seq_index,
                                      batch.token_position, pad_block_tables(batch.block_tables),
                                      batch.context_lens, batch.block_size,
                                      rope=(Tensor(positions), Tensor(cos), Tensor(sin)))
        results.append((out.asnumpy(), caches[0].asnumpy(), caches[1].asnumpy()))
        np.testing.assert_array_equal(q_in.asnumpy(), q)  # inputs untouched
    (out, keys, values), (ref_out, ref_keys, ref_values) = results
    np.testing.assert_array_equal(keys, ref_keys)  # the same rounding as the rope composite
    np.testing.assert_array_equal(values, ref_values)
    assert_close(out, ref_out)


@needs_cpu
@pytest.mark.parametrize("rope", [True, False])
@pytest.mark.parametrize("kv,heads,d", [(2, 8, 64), (4, 4, 112), (1, 3, 128)])
def test_paged_attention_fused_qkv(rope, kv, heads, d):
    """q = the fused projection [N, H + 2 KV, d], k_new = v_new = None: the same outputs and cache as split q/k/v,
    on both backends."""
    rng = np.random.default_rng(heads * d + rope)
    batch = make_paged_batch([19, 6, 40], [19, 1, 8], 4, rng, shuffle=True)
    n = len(batch.seq_index)
    cos, sin = rope_table(default_inv_freq(d, 10000.0), 256)
    positions = rng.integers(0, 256, n).astype(np.int32)
    qkv = normal(rng, n, heads + 2 * kv, d)
    key0, value0 = normal(rng, batch.num_slots, kv, d), normal(rng, batch.num_slots, kv, d)
    meta = (batch.slot_mapping, batch.seq_index, batch.token_position, pad_block_tables(batch.block_tables),
            batch.context_lens, batch.block_size)
    rope_args = (Tensor(positions), Tensor(cos), Tensor(sin)) if rope else None
    results = []
    for kernels, fused in ((REF, False), (CPU, True), (REF, True)):
        caches = [Parameter(Tensor(c.copy()), name=f"f{i}", requires_grad=False) for i, c in enumerate((key0, value0))]
        if fused:
            out = kernels.paged_attention(Tensor(qkv.copy()), None, None, *caches, *meta, rope=rope_args)
        else:
            q, k, v = (Tensor(np.ascontiguousarray(part)) for part in
                       (qkv[:, :heads], qkv[:, heads:heads + kv], qkv[:, heads + kv:]))
            out = kernels.paged_attention(q, k, v, *caches, *meta, rope=rope_args)
        results.append((out.asnumpy(), caches[0].asnumpy(), caches[1].asnumpy()))
    (ref_out, ref_keys, ref_values) = results[0]
    for out, keys, values in results[1:]:
        assert out.shape == (n, heads * d)
        assert_close(out, ref_out)
        np.testing.assert_array_equal(keys, ref_keys)
        np.testing.assert_array_equal(values, ref_values)


@needs_cpu
def test_paged_attention_rejects_bad_metadata():
    rng = np.random.default_rng(0)
    batch = make_paged_batch([8], [8], 4, rng)
    batch.token_position[0] = 8  # beyond the context
    with pytest.raises(RuntimeError):
        run_paged(CPU, normal(rng, 8, 2, 8), normal(rng, 8, 1, 8), normal(rng, 8, 1, 8),
                  normal(rng, batch.num_slots, 1, 8), normal(rng, batch.num_slots, 1, 8), batch, as_tensors=True)


# ---------------------------------------------------------------- 16-bit KV caches

# (context_lens, new_tokens, shuffle): the chunk from position 203 starts mid-block for block sizes 4, 16 and 128
CACHE_BATCHES = {
    "decode": ([5, 130, 257, 2], [1, 1, 1, 1], False),
    "chunk-mid-block": ([260], [57], False),
    "mixed": ([40, 260, 9], [1, 57, 1], False),
    "mixed-shuffled": ([40, 260, 9, 131], [1, 57, 1, 6], True),
}


def paged_call(kernels, qkv: np.ndarray, kv: int, caches, batch, rope, fused: bool) -> np.ndarray:
    """paged_attention of the fused projection qkv [N, H + 2 KV, d] as one tensor (fused) or as q, k and v."""
    heads = qkv.shape[1] - 2 * kv
    meta = (batch.slot_mapping, batch.seq_index, batch.token_position, pad_block_tables(batch.block_tables),
            batch.context_lens, batch.block_size)
    if fused:
        return kernels.paged_attention(Tensor(qkv.copy()), None, None, *caches, *meta, rope=rope).asnumpy()
    q, k, v = (Tensor(np.ascontiguousarray(part)) for part in
               (qkv[:, :heads], qkv[:, heads:heads + kv], qkv[:, heads + kv:]))
    return kernels.paged_attention(q, k, v, *caches, *meta, rope=rope).asnumpy()


def check_cache_dtype(dtype: str, batch, heads: int, kv: int, d: int, fused: bool, rope: bool, seed: int) -> None:
    """Kernel vs reference: the same cache bits (this step's rows rounded to nearest even), outputs within fp32
    rounding; without rotary, the written rows are also numpy's / ml_dtypes' rounding of k and v."""
    rng = np.random.default_rng(seed)
    n = len(batch.seq_index)
    qkv = normal(rng, n, heads + 2 * kv, d)
    key0, value0 = normal(rng, batch.num_slots, kv, d), normal(rng, batch.num_slots, kv, d)
    rope_args = None
    if rope:
        cos, sin = rope_table(default_inv_freq(d, 10000.0), 512)
        rope_args = (Tensor(rng.integers(0, 512, n).astype(np.int32)), Tensor(cos), Tensor(sin))
    results = []
    for kernels in (CPU, REF):
        caches = [cache_parameter(c, dtype, f"c{i}") for i, c in enumerate((key0, value0))]
        out = paged_call(kernels, qkv, kv, caches, batch, rope_args, fused)
        keys, values = caches[0].asnumpy(), caches[1].asnumpy()
        assert keys.dtype.name == values.dtype.name == dtype  # written in place, in the cache's dtype
        results.append((out, cache_bits(keys), cache_bits(values)))
    (out, keys, values), (ref_out, ref_keys, ref_values) = results
    np.testing.assert_array_equal(keys, ref_keys)
    np.testing.assert_array_equal(values, ref_values)
    assert_close(out, ref_out)
    rounded = cache_bits(qkv.astype(CACHE_DTYPES[dtype]))
    np.testing.assert_array_equal(values[batch.slot_mapping], rounded[:, heads + kv:])
    if not rope:
        np.testing.assert_array_equal(keys[batch.slot_mapping], rounded[:, heads:heads + kv])
    untouched = np.setdiff1d(np.arange(batch.num_slots), batch.slot_mapping)
    np.testing.assert_array_equal(values[untouched], cache_bits(value0.astype(CACHE_DTYPES[dtype]))[untouched])


@needs_cpu
@pytest.mark.parametrize("rope", [False, True], ids=["no-rope", "rope"])
@pytest.mark.parametrize("fused", [False, True], ids=["split", "fused-qkv"])
@pytest.mark.parametrize("kind", list(CACHE_BATCHES))
@pytest.mark.parametrize("block_size", [4, 16, 128])
@pytest.mark.parametrize("dtype", list(CACHE_DTYPES))
def test_paged_attention_cache_dtypes(dtype, block_size, kind, fused, rope):
    lens, new, shuffle = CACHE_BATCHES[kind]
    batch = make_paged_batch(lens, new, block_size, np.random.default_rng(block_size), shuffle=shuffle)
    check_cache_dtype(dtype, batch, 8, 2, 64, fused, rope, seed=block_size + 2 * fused + rope)


@needs_cpu
@pytest.mark.parametrize("heads_per_kv,head_dim", [(1, 128), (3, 112), (4, 40), (12, 64)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_paged_attention_cache_dtypes_head_shapes(dtype, heads_per_kv, head_dim):
    """The other inner loops: one query row per KV head, a decode's 12 rows (transposed scores), a head_dim off
    the 16-lane vectors (the plain loops)."""
    lens, new, _ = CACHE_BATCHES["mixed-shuffled"]
    batch = make_paged_batch(lens, new, 16, np.random.default_rng(head_dim), shuffle=True)
    check_cache_dtype(dtype, batch, heads_per_kv * 2, 2, head_dim, fused=True, rope=True, seed=heads_per_kv)


def bf16_attention(kernels_cls, dtype: str, batch, heads: int, kv: int, d: int, seed: int, query_tile: int = 16,
                   key_tile: int = 32):
    """paged_attention with compute dtype bfloat16 (bf16 math over a bf16 cache): the output and the caches."""
    params = load_params(path="/nonexistent")
    for cls in ("decode", "prefill"):
        params.ops["paged_attention"][cls].update(query_tile=query_tile, key_tile=key_tile, threads=2,
                                                  parallel_min_work=0)
    kernels = kernels_cls(params, "bfloat16")
    rng = np.random.default_rng(seed)
    qkv = normal(rng, len(batch.seq_index), heads + 2 * kv, d)
    caches = [cache_parameter(normal(rng, batch.num_slots, kv, d), dtype, f"c{i}") for i in range(2)]
    cos, sin = rope_table(default_inv_freq(d, 10000.0), 512)
    rope = (Tensor(rng.integers(0, 512, len(batch.seq_index)).astype(np.int32)), Tensor(cos), Tensor(sin))
    return paged_call(kernels, qkv, kv, caches, batch, rope, fused=True), [c.asnumpy() for c in caches]


@needs_cpu
@pytest.mark.parametrize("kind", list(CACHE_BATCHES))
@pytest.mark.parametrize("heads_per_kv,head_dim", [(4, 64), (4, 128), (1, 128), (3, 112), (12, 64), (2, 40)])
@pytest.mark.parametrize("block_size", [16, 128])
def test_bf16_attention_matches_its_composite(kind, heads_per_kv, head_dim, block_size):
    """Compute dtype bfloat16 over a bf16 cache: P rounded to bf16 before P @ V, products by vdpbf16ps on the query
    tiles (Q K^T on the queries split in two bf16 parts; fp32 FMAs of the rounded P on decodes, off-vector
    head_dims and without avx512_bf16). Against the composite with the same rounding, to bf16's precision (the
    online softmax rounds each key tile's unnormalised P, the composite the whole row's)."""
    lens, new, shuffle = CACHE_BATCHES[kind]
    batch = make_paged_batch(lens, new, block_size, np.random.default_rng(block_size), shuffle=shuffle)
    args = ("bfloat16", batch, heads_per_kv * 2, 2, head_dim, heads_per_kv + head_dim)
    out, caches = bf16_attention(CpuKernels, *args)
    ref_out, ref_caches = bf16_attention(ReferenceKernels, *args)
    for cache, ref_cache in zip(caches, ref_caches):
        np.testing.assert_array_equal(cache_bits(cache), cache_bits(ref_cache))
    assert_close(out, ref_out, rtol=4e-3)


@needs_cpu
def test_bf16_attention_rounds_what_it_says():
    """bf16 math is not float32 math in disguise: kernel and composite both move off their float32 results by
    bf16's rounding of P (far above float32's), and stay within it of each other."""
    lens, new, _ = CACHE_BATCHES["mixed"]
    batch = make_paged_batch(lens, new, 16, np.random.default_rng(3), shuffle=False)
    args = ("bfloat16", batch, 8, 2, 64, 9)
    in_float32 = lambda cls: (lambda params, _: cls(params, "float32"))  # noqa: E731
    outputs = {name: bf16_attention(cls, *args)[0] for name, cls in [
        ("kernel", CpuKernels), ("composite", ReferenceKernels), ("kernel-f32", in_float32(CpuKernels)),
        ("composite-f32", in_float32(ReferenceKernels))]}
    scale = np.abs(outputs["composite-f32"]).max()
    off = lambda a, b: np.abs(outputs[a] - outputs[b]).max() / scale  # noqa: E731
    assert off("kernel-f32", "composite-f32") < 1e-5
    assert 1e-4 < off("kernel", "kernel-f32") < 4e-3 and 1e-4 < off("composite", "composite-f32") < 4e-3
    assert off("kernel", "composite") < 4e-3


@needs_cpu
@pytest.mark.parametrize("kind", ["chunk-mid-block", "mixed-shuffled"])
@pytest.mark.parametrize("heads_per_kv,head_dim", [(4, 64), (4, 128), (12, 64)])
@pytest.mark.parametrize("block_size,key_tile", [(16, 32), (16, 40), (128, 64)])
def test_bf16_attention_on_amx_tiles_matches_the_vdpbf16ps_form(monkeypatch, kind, heads_per_kv, head_dim,
                                                                 block_size, key_tile):
    """The query tiles' bf16 products on AMX tiles (keys straight from the cache where 16 are consecutive slots,
    else copied: a key tile of 40 breaks the runs; V transposed per key tile) against the vdpbf16ps form: the same
    softmax and rounding of P, fp32 sums in another order: not the same bits, and where a score moved by its fp32
    rounding took P to the other bf16 neighbour, an output moves by a fraction of that P's rounding."""
    if not CPU.ops.has_amx:
        pytest.skip("this CPU has no AMX tiles")
    lens, new, shuffle = CACHE_BATCHES[kind]
    batch = make_paged_batch(lens, new, block_size, np.random.default_rng(block_size), shuffle=shuffle)
    args = ("bfloat16", batch, heads_per_kv * 2, 2, head_dim, heads_per_kv + head_dim)
    outputs = {}
    for amx in ("0", "1"):
        monkeypatch.setenv(registry.AMX_ENV, amx)
        outputs[amx] = bf16_attention(CpuKernels, *args, key_tile=key_tile)[0]
    assert not np.array_equal(outputs["1"], outputs["0"])
    assert_close(outputs["1"], outputs["0"], rtol=1e-3)


def rounding_cases() -> np.ndarray:
    """fp32 values whose rounding to bfloat16 or float16 is easy to get wrong (ties each way and their neighbours,
    subnormals, overflow to infinity, infinities, NaNs whose payload could carry into the exponent, signed zeros),
    then random bit patterns."""
    bf16 = [0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF, 0x00018000, 0x00008000, 0x00000001, 0x807FFFFF,
            0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF]
    fp16 = [0x3F801000, 0x3F803000, 0x3F801001, 0x3F800FFF, 0x33000000, 0x33000001, 0x33800000, 0x33C00000,
            0x387FC000, 0x387FE000, 0x387FF000, 0x38800000, 0x477FE000, 0x477FEFFF, 0x477FF000, 0x477FF001,
            0x501502F9]
    special = [0x00000000, 0x7F800000, 0x7FC00000, 0x7F800001, 0x7FFFFFFF, 0x7FA00000]
    patterns = np.array(bf16 + fp16 + special, np.uint32)
    patterns = np.concatenate([patterns, patterns | 0x80000000])
    random = np.random.default_rng(7).integers(0, 2 ** 32, 4000, dtype=np.uint64).astype(np.uint32)
    return np.concatenate([patterns, random]).view(np.float32)


def assert_rounded(cache: np.ndarray, values: np.ndarray) -> None:
    """cache holds values rounded to nearest even to its dtype by numpy / ml_dtypes (a NaN as some NaN)."""
    with np.errstate(all="ignore"):
        expected = values.astype(CACHE_DTYPES[cache.dtype.name])
    nan = np.isnan(values)
    np.testing.assert_array_equal(np.isnan(cache.astype(np.float32)), nan)
    np.testing.assert_array_equal(cache_bits(cache)[~nan], cache_bits(expected)[~nan])


def rounding_rows(width: int) -> np.ndarray:
    cases = rounding_cases()
    rows = -(-cases.size // width)
    return np.resize(cases, rows * width).reshape(rows, 1, width)


@pytest.mark.parametrize("path", ["write_kv", "paged_attention"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_cache_write_rounds_to_nearest_even(backend, dtype, path):
    """A written entry is numpy's / ml_dtypes' round-to-nearest-even of the fp32 value: rows of 24 (a 16-lane
    vector and a scalar tail)."""
    if backend == "cpu" and CPU is None:
        pytest.skip("CPU kernel library not built")
    kernels = CPU if backend == "cpu" else REF
    values = rounding_rows(24)
    n = values.shape[0]
    batch = make_paged_batch([n], [n], 16, np.random.default_rng(2))
    caches = [cache_parameter(np.zeros((batch.num_slots, 1, 24), np.float32), dtype, f"r{i}") for i in range(2)]
    if path == "write_kv":
        kernels.write_kv(caches[0], Tensor(batch.slot_mapping), Tensor(values))
        kernels.write_kv(caches[1], Tensor(batch.slot_mapping), Tensor(values))
    else:
        with np.errstate(all="ignore"):
            kernels.paged_attention(Tensor(values), Tensor(values), Tensor(values), *caches, batch.slot_mapping,
                                    batch.seq_index, batch.token_position, pad_block_tables(batch.block_tables),
                                    batch.context_lens, batch.block_size)
    for cache in caches:
        assert_rounded(cache.asnumpy()[batch.slot_mapping], values)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_cache_dtypes_must_match_and_be_known(backend):
    if backend == "cpu" and CPU is None:
        pytest.skip("CPU kernel library not built")
    kernels = CPU if backend == "cpu" else REF
    rng = np.random.default_rng(0)
    batch = make_paged_batch([8], [8], 4, rng)
    q, k, v = normal(rng, 8, 2, 8), normal(rng, 8, 1, 8), normal(rng, 8, 1, 8)
    cache = normal(rng, batch.num_slots, 1, 8)
    mixed = (cache_parameter(cache, "bfloat16", "kb"), cache_parameter(cache, "float16", "vh"))
    args = (batch.slot_mapping, batch.seq_index, batch.token_position, pad_block_tables(batch.block_tables),
            batch.context_lens, 4)
    with pytest.raises(ValueError, match="value cache is Float16"):
        kernels.paged_attention(Tensor(q), Tensor(k), Tensor(v), *mixed, *args)
    doubles = [Parameter(Tensor(cache.astype(np.float64)), name=f"d{i}", requires_grad=False) for i in range(2)]
    with pytest.raises(ValueError, match="not one of"):
        kernels.paged_attention(Tensor(q), Tensor(k), Tensor(v), *doubles, *args)
    with pytest.raises(ValueError, match="not one of"):
        kernels.write_kv(doubles[0], Tensor(batch.slot_mapping), Tensor(k))


@needs_cpu
def test_paged_attention_kernel_status_for_mixed_caches():
    """Past the Python check, the kernel itself refuses caches of two dtypes (kCacheDtypeMismatch)."""
    rng = np.random.default_rng(0)
    batch = make_paged_batch([8], [8], 4, rng)
    cache = normal(rng, batch.num_slots, 1, 8)
    i32 = lambda a: Tensor(np.asarray(a, np.int32))  # noqa: E731
    dummy = Tensor(np.zeros(1, np.float32))
    with pytest.raises(RuntimeError):
        CPU.ops.paged_attention(Tensor(normal(rng, 8, 2, 8)), Tensor(normal(rng, 8, 1, 8)),
                                Tensor(normal(rng, 8, 1, 8)), cache_parameter(cache, "bfloat16", "kb"),
                                cache_parameter(cache, "float16", "vh"), i32(batch.slot_mapping),
                                i32(batch.seq_index), i32(batch.token_position),
                                i32(pad_block_tables(batch.block_tables)), i32(batch.context_lens),
                                i32([0]), dummy, dummy, CPU._config("paged_attention", 8, 4, 0, 0))


# The portable build: the attention kernels compiled for baseline x86-64 (no AVX-512, no F16C) and called
# through the AOT convention directly (ctypes), against the library built for this machine.

AOT_DTYPES = {np.dtype(np.float32): b"float32", np.dtype(np.int32): b"int32",
              np.dtype(ml_dtypes.bfloat16): b"bfloat16", np.dtype(np.float16): b"float16", np.dtype(np.int8): b"int8"}
KERNEL_SOURCES = Path(__file__).resolve().parents[1] / "kernels" / "cpu"


def call_aot(library: ctypes.CDLL, symbol: str, arrays: list[np.ndarray]) -> int:
    """Calls an AOT entry point as MindSpore does: inputs then outputs, their ranks, shapes and dtype names."""
    n = len(arrays)
    shapes = [(ctypes.c_int64 * max(a.ndim, 1))(*a.shape) for a in arrays]
    return getattr(library, symbol)(
        n, (ctypes.c_void_p * n)(*[a.ctypes.data for a in arrays]), (ctypes.c_int * n)(*[a.ndim for a in arrays]),
        (ctypes.POINTER(ctypes.c_int64) * n)(*[ctypes.cast(s, ctypes.POINTER(ctypes.c_int64)) for s in shapes]),
        (ctypes.c_char_p * n)(*[AOT_DTYPES[a.dtype] for a in arrays]), None, None)


@pytest.fixture(scope="module")
def portable_library(tmp_path_factory) -> ctypes.CDLL:
    cxx = shutil.which("g++")
    if cxx is None or CPU is None or ms.get_context("device_target") != "CPU" or not hasattr(np, "float16"):
        pytest.skip("needs g++ and the CPU kernel library")
    import platform
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the portable build is checked on x86-64")
    out = tmp_path_factory.mktemp("portable") / "portable_attention.so"
    sources = [str(KERNEL_SOURCES / name)
               for name in ("rope.cc", "kv_cache.cc", "paged_attention.cc", "attention_amx.cc", "gemm_amx.cc")]
    build = subprocess.run([cxx, "-O2", "-std=c++17", "-march=x86-64", "-fopenmp-simd", "-pthread", "-shared",
                            "-fPIC", *sources, "-o", str(out)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    return ctypes.CDLL(str(out))


def aot_paged_arrays(rng, dtype: str, heads: int, kv: int, d: int, batch) -> list[np.ndarray]:
    n = len(batch.seq_index)
    cos, sin = rope_table(default_inv_freq(d, 10000.0), 512)
    caches = [normal(rng, batch.num_slots, kv, d).astype(CACHE_DTYPES[dtype]) for _ in range(2)]
    config = np.array([batch.block_size, 2, 4, 32, 0, 1], np.int32)
    return [normal(rng, n, heads, d), normal(rng, n, kv, d), normal(rng, n, kv, d), *caches, batch.slot_mapping,
            batch.seq_index, batch.token_position, pad_block_tables(batch.block_tables), batch.context_lens,
            rng.integers(0, 512, n).astype(np.int32), cos, sin, config, np.zeros((n, heads * d), np.float32)]


@needs_cpu
@pytest.mark.parametrize("head_dim", [64, 40])
@pytest.mark.parametrize("dtype", list(CACHE_DTYPES))
def test_portable_paged_attention_matches_the_native_build(portable_library, dtype, head_dim):
    from kernels.library import load_library
    native = ctypes.CDLL(load_library().path)
    lens, new, _ = CACHE_BATCHES["mixed-shuffled"]
    batch = make_paged_batch(lens, new, 16, np.random.default_rng(5), shuffle=True)
    inputs = aot_paged_arrays(np.random.default_rng(head_dim), dtype, 8, 2, head_dim, batch)
    results = []
    for library in (native, portable_library):
        arrays = [a.copy() for a in inputs]
        assert call_aot(library, "PagedAttention", arrays) == 0
        results.append(arrays)
    native_out, portable_out = results
    np.testing.assert_array_equal(cache_bits(portable_out[3]), cache_bits(native_out[3]))
    np.testing.assert_array_equal(cache_bits(portable_out[4]), cache_bits(native_out[4]))
    assert_close(portable_out[14], native_out[14])


@needs_cpu
def test_portable_bf16_attention_is_the_native_one_to_bf16_precision(portable_library):
    """bf16 math in the portable build (fp32 FMAs of the rounded P) against vdpbf16ps in the native one."""
    from kernels.library import load_library
    native = ctypes.CDLL(load_library().path)
    lens, new, _ = CACHE_BATCHES["mixed-shuffled"]
    batch = make_paged_batch(lens, new, 16, np.random.default_rng(6), shuffle=True)
    inputs = aot_paged_arrays(np.random.default_rng(7), "bfloat16", 8, 2, 64, batch)
    inputs[13] = np.array([batch.block_size, 2, 4, 32, 0, 1, 1], np.int32)  # the 7th entry: bf16 math
    outputs = []
    for library in (native, portable_library):
        arrays = [a.copy() for a in inputs]
        assert call_aot(library, "PagedAttention", arrays) == 0
        outputs.append(arrays[14])
    assert_close(outputs[1], outputs[0], rtol=4e-3)


# The helper threads (common.h HelperThreads): one process-wide set, taken by one call at a time.

def threaded_projection(library: ctypes.CDLL, x: np.ndarray, w: np.ndarray, threads: int) -> np.ndarray:
    """ExpertLinear through the AOT convention: every row by the language expert, our GEMM on [out, in] float32
    weights, `threads` threads whatever the size (parallel_min_work 0)."""
    config = np.array([x.shape[0], 0, threads, 0, 0, 0, 0, 0, 0, 0, 0, 0], np.int32)
    arrays = [x, w, w, np.zeros(1, np.float32), config, np.zeros((x.shape[0], w.shape[0]), np.float32)]
    assert call_aot(library, "ExpertLinear", arrays) == 0
    return arrays[-1]


@needs_cpu
def test_projections_called_from_several_threads_at_once_keep_their_bits():
    """Concurrent calls: one holds the helpers, the others spawn theirs; every result as on one thread."""
    from concurrent.futures import ThreadPoolExecutor
    from kernels.library import load_library
    library = ctypes.CDLL(load_library().path)
    rng = np.random.default_rng(8)
    x, w = normal(rng, 7, 256), normal(rng, 512, 256)
    expected = threaded_projection(library, x, w, threads=1)
    with ThreadPoolExecutor(4) as pool:  # ctypes releases the GIL during the call
        results = list(pool.map(lambda _: threaded_projection(library, x, w, threads=3), range(64)))
    for result in results:
        np.testing.assert_array_equal(result, expected)


@needs_cpu
def test_a_forked_child_gets_helper_threads_of_its_own():
    """A child inherits none of its parent's threads: its parallel calls must not wait on the parent's helpers."""
    import os
    import select
    from kernels.library import load_library
    library = ctypes.CDLL(load_library().path)
    rng = np.random.default_rng(9)
    x, w = normal(rng, 5, 128), normal(rng, 256, 128)
    expected = threaded_projection(library, x, w, threads=2)  # the parent's helpers exist from here on
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover  (runs in the child)
        try:
            os.write(write_end, threaded_projection(library, x, w, threads=2).tobytes())
        finally:
            os._exit(0)
    os.close(write_end)
    ready, _, _ = select.select([read_end], [], [], 30)
    data = os.read(read_end, expected.nbytes) if ready else b""
    os.close(read_end)
    if not ready:
        os.kill(child, 9)
    os.waitpid(child, 0)
    assert ready, "the forked child's parallel call did not finish within 30 s"
    np.testing.assert_array_equal(np.frombuffer(data, np.float32).reshape(expected.shape), expected)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_portable_cache_write_rounds_to_nearest_even(portable_library, dtype):
    values = rounding_rows(24)
    cache = np.zeros((values.shape[0] + 3, 1, 24), CACHE_DTYPES[dtype])
    slots = np.arange(values.shape[0], dtype=np.int32)
    assert call_aot(portable_library, "WriteKVCache", [cache, slots, values, np.zeros(1, np.int32)]) == 0
    assert_rounded(cache[slots], values)


# ---------------------------------------------------------------- KV-cache write

@needs_cpu
def test_write_kv_in_place():
    rng = np.random.default_rng(1)
    cache0, values = normal(rng, 64, 2, 16), normal(rng, 10, 2, 16)
    slots = rng.permutation(64)[:10].astype(np.int32)
    results = []
    for kernels in (CPU, REF):
        cache = Parameter(Tensor(cache0.copy()), name="cache", requires_grad=False)
        kernels.write_kv(cache, Tensor(slots), Tensor(values))
        results.append(cache.asnumpy())
    expected = cache0.copy()
    expected[slots] = values
    np.testing.assert_array_equal(results[0], expected)
    np.testing.assert_array_equal(results[1], expected)


# ---------------------------------------------------------------- rotary

def rope_inputs(rng, n: int, heads: int, kv: int, head_dim: int, table_len: int):
    return normal(rng, n, heads, head_dim), normal(rng, n, kv, head_dim), rng.integers(0, table_len, n)


@needs_cpu
@pytest.mark.parametrize("head_dim", [64, 112, 128])
@pytest.mark.parametrize("table", ["fp32", "bf16"])
def test_rope_matches_reference(head_dim, table):
    rng = np.random.default_rng(head_dim)
    inv_freq = default_inv_freq(head_dim, 500000.0)
    cos, sin = rope_table(inv_freq.astype(BF16) if table == "bf16" else inv_freq, 4096)
    q, k, positions = rope_inputs(rng, 300, 8, 2, head_dim, 4096)
    ref_q, ref_k = REF.rope(Tensor(q), Tensor(k), positions, Tensor(cos), Tensor(sin))
    qt, kt = Tensor(q.copy()), Tensor(k.copy())
    out_q, out_k = CPU.rope(qt, kt, positions, Tensor(cos), Tensor(sin))
    # same products and sum as the composite, no FMA contraction: bit-identical
    np.testing.assert_array_equal(out_q.asnumpy(), ref_q.asnumpy())
    np.testing.assert_array_equal(out_k.asnumpy(), ref_k.asnumpy())
    np.testing.assert_array_equal(qt.asnumpy(), ref_q.asnumpy())  # in place
    np.testing.assert_array_equal(kt.asnumpy(), ref_k.asnumpy())


@needs_cpu
def test_rope_of_strided_views():
    """q and k sliced out of the fused QKV output are strided views in PyNative: the result must still be right."""
    rng = np.random.default_rng(4)
    n, heads, kv, d = 6, 4, 2, 16
    qkv = Tensor(normal(rng, n, (heads + 2 * kv) * d))
    cos, sin = rope_table(default_inv_freq(d, 10000.0), 32)
    positions = rng.integers(0, 32, n)
    q, k = qkv[:, :heads * d].reshape(n, heads, d), qkv[:, heads * d:(heads + kv) * d].reshape(n, kv, d)
    ref_q, ref_k = REF.rope(q, k, positions, Tensor(cos), Tensor(sin))
    out_q, out_k = CPU.rope(q, k, positions, Tensor(cos), Tensor(sin))
    np.testing.assert_array_equal(out_q.asnumpy(), ref_q.asnumpy())
    np.testing.assert_array_equal(out_k.asnumpy(), ref_k.asnumpy())


@needs_cpu
@pytest.mark.skipif(CPU.ops.eager is None, reason="the pyboost extension is not built here")
def test_rope_eager_twin_matches_the_aot_op_and_rejects_bad_positions():
    """Eager rope goes through the pyboost twin (kernels/pyboost.py); the same kernel as the AOT op."""
    rng = np.random.default_rng(21)
    cos, sin = rope_table(default_inv_freq(64, 10000.0), 128)
    q, k, positions = rope_inputs(rng, 9, 4, 2, 64, 128)
    config = CPU._config("rope", 9)
    args = (Tensor(positions.astype(np.int32)), Tensor(cos), Tensor(sin), config)
    eager_q, eager_k = Tensor(q.copy()), Tensor(k.copy())
    CPU.ops.eager.run_inplace("RopeInplace", [eager_q, eager_k, *args])
    aot_q, aot_k = Tensor(q.copy()), Tensor(k.copy())
    CPU.ops._rope(aot_q, aot_k, *args)
    np.testing.assert_array_equal(eager_q.asnumpy(), aot_q.asnumpy())
    np.testing.assert_array_equal(eager_k.asnumpy(), aot_k.asnumpy())
    assert not np.array_equal(eager_q.asnumpy(), q)  # it did rotate
    bad = Tensor(np.full(9, 500, np.int32))  # past the 128-row table
    with pytest.raises(RuntimeError, match="RopeInplace failed: its status is 4"):
        CPU.rope(Tensor(q.copy()), Tensor(k.copy()), bad, Tensor(cos), Tensor(sin))
    again_q, _ = CPU.rope(Tensor(q.copy()), Tensor(k.copy()), args[0], Tensor(cos), Tensor(sin))  # still serving
    np.testing.assert_array_equal(again_q.asnumpy(), aot_q.asnumpy())


def test_pyboost_extension_is_optional(tmp_path, monkeypatch):
    from kernels import pyboost
    monkeypatch.setattr(pyboost, "BUILD_DIR", tmp_path)  # nothing built there
    assert not pyboost.is_built() and pyboost.load("/nonexistent.so") is None


@pytest.mark.skipif(CPU.ops.eager is None, reason="the pyboost extension is not built here")
def test_pyboost_load_ignores_a_stale_build_lock(tmp_path, monkeypatch):
    """A process killed while MindSpore's builder held its lock must not make later start-ups wait forever."""
    import shutil
    import threading
    from kernels import pyboost
    shutil.copytree(pyboost.BUILD_DIR, tmp_path / "build")
    monkeypatch.setattr(pyboost, "BUILD_DIR", tmp_path / "build")
    (tmp_path / "build" / "build.lock").write_bytes(b"")
    loaded = []
    worker = threading.Thread(target=lambda: loaded.append(pyboost.load(CPU.ops.library.path)), daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert loaded and loaded[0] is not None


@needs_cpu
def test_rope_bf16_fixture_table():
    """The table rebuilt by cogvlm2.rope from a bf16 inv_freq is the published one; the kernel reads it as is."""
    fixture = np.load(FIXTURES / "rope_bf16.npz")
    inv_freq = default_inv_freq(128, 500000.0).astype(BF16)
    cos, sin = rope_table(inv_freq, 8192)
    rng = np.random.default_rng(3)
    q, k, positions = rope_inputs(rng, 64, 4, 1, 128, 8192)
    out_q, _ = CPU.rope(Tensor(q.copy()), Tensor(k.copy()), positions, Tensor(cos), Tensor(sin))
    expected = q * cos[positions][:, None] + np.concatenate([-q[..., 64:], q[..., :64]], -1) * sin[positions][:, None]
    assert_close(out_q.asnumpy(), expected, 1e-6)
    assert set(fixture.files)  # the fixture exists and loads


# ---------------------------------------------------------------- expert-routed projection

def expert_params(gemm: int, k_block: int, n_block: int, threads: int = 2):
    params = load_params(path="/nonexistent")
    for cls in ("decode", "prefill"):
        params.ops["expert_linear"][cls].update(gemm=gemm, k_block=k_block, n_block=n_block, threads=threads)
    return params


GEMMS = [(0, 4096, 0), (0, 40, 8), (0, 512, 64), (1, 0, 0), (2, 0, 0), (3, 0, 0)]


@needs_cpu
@pytest.mark.parametrize("gemm", GEMMS,
                         ids=["own", "own-blocked-small", "own-blocked", "openblas", "onednn", "mindspore"])
@pytest.mark.parametrize("n,num_language", [(1, 1), (1, 0), (7, 3), (70, 0), (70, 70), (70, 33), (400, 150)])
@pytest.mark.parametrize("bias", [True, False])
def test_expert_linear(gemm, n, num_language, bias):
    if (gemm[0] == 1 and not CPU.ops.has_openblas) or (gemm[0] == 2 and not CPU.ops.has_onednn):
        pytest.skip("GEMM library not found")
    kernels = CpuKernels(expert_params(*gemm))
    rng = np.random.default_rng(n + num_language)
    x, wl, wv, bv = normal(rng, n, 77), normal(rng, 45, 77), normal(rng, 45, 77), normal(rng, 45)
    args = (Tensor(x), num_language, Tensor(wl), Tensor(wv), Tensor(bv) if bias else None)
    expected = REF.expert_linear(*args).asnumpy()
    np.testing.assert_allclose(expected[:num_language], x[:num_language] @ wl.T, rtol=1e-4, atol=1e-4)
    assert_close(kernels.expert_linear(*args).asnumpy(), expected)


@needs_cpu
@pytest.mark.parametrize("n,num_language", [(1, 1), (1, 0), (9, 4), (70, 0), (70, 70), (300, 131)])
@pytest.mark.parametrize("out,inner", [(32, 77), (96, 64), (160, 300)])
@pytest.mark.parametrize("k_block", [0, 64])
@pytest.mark.parametrize("bias", [True, False])
def test_expert_linear_prepacked(n, num_language, out, inner, k_block, bias):
    kernels = CpuKernels(expert_params(sku.GEMM_PREPACKED, k_block, 0))
    rng = np.random.default_rng(n + out + inner)
    x, wl, wv, bv = normal(rng, n, inner), normal(rng, out, inner), normal(rng, out, inner), normal(rng, out)
    packed_l, packed_v = kernels.prepare_weight(wl), kernels.prepare_weight(wv)
    assert packed_l.shape == (out // 32, inner, 32)
    expected = REF.expert_linear(Tensor(x), num_language, Tensor(wl), Tensor(wv), Tensor(bv) if bias else None)
    got = kernels.expert_linear(Tensor(x), num_language, packed_l, packed_v, Tensor(bv) if bias else None)
    assert got.shape == (n, out)
    assert_close(got.asnumpy(), expected.asnumpy())
    assert_close(kernels.linear(Tensor(x), packed_l).asnumpy(), x @ wl.T)


def test_pack_weight_round_trip_and_its_limit():
    from kernels.ops import pack_weight, unpack_weight
    w = np.arange(64 * 5, dtype=np.float32).reshape(64, 5)
    for dtype in (np.float32, np.float16):
        packed = pack_weight(w.astype(dtype))
        assert packed.shape == (2, 5, 32) and packed.dtype == dtype and packed[1, 3, 7] == w[32 + 7, 3]
        np.testing.assert_array_equal(unpack_weight(packed), w.astype(dtype))
    with pytest.raises(ValueError, match="out features 48"):
        pack_weight(np.zeros((48, 5), np.float32))
    with pytest.raises(ValueError, match="dtype int32"):
        pack_weight(np.zeros((32, 5), np.int32))


@pytest.mark.parametrize("inner", [5, 6])
def test_pack_weight_bf16_k_pairs(inner):
    """bf16: [out / 32, ceil(in / 2), 32, 2], k pairs of one column adjacent; an odd `in` padded with a zero."""
    from kernels.ops import pack_weight, unpack_weight
    w = np.arange(64 * inner, dtype=np.float32).reshape(64, inner).astype(BF16)
    packed = pack_weight(w)
    assert packed.shape == (2, (inner + 1) // 2, 32, 2) and packed.dtype == BF16
    assert packed[1, 1, 7, 0] == w[32 + 7, 2] and packed[1, 1, 7, 1] == w[32 + 7, 3]
    if inner % 2:
        assert not packed[:, -1, :, 1].astype(np.float32).any()
    np.testing.assert_array_equal(unpack_weight(packed, inner), w)
@needs_cpu
def test_prepare_weight_layouts():
    """Prepacked where the table says so and the rows allow; plain otherwise, and plain on the reference backend."""
    packing = CpuKernels(expert_params(sku.GEMM_PREPACKED, 0, 0))
    plain = CpuKernels(expert_params(0, 0, 0))
    w = np.ones((64, 8), np.float32)
    assert packing.prepacks_weights and not plain.prepacks_weights
    assert packing.prepare_weight(w).shape == (2, 8, 32)
    assert packing.prepare_weight(np.ones((48, 8), np.float32)).shape == (48, 8)  # a 48-row shard stays plain
    assert plain.prepare_weight(w).shape == (64, 8)
    assert REF.prepare_weight(w).shape == (64, 8)
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    odd = np.random.default_rng(1).standard_normal((48, 8)).astype(np.float32)
    assert_close(packing.expert_linear(Tensor(x), 2, packing.prepare_weight(odd), packing.prepare_weight(odd),
                                       None).asnumpy(), x @ odd.T)


# ---------------------------------------------------------------- panel GEMM variants (16-bit weights)

# (name, weight dtype, compute dtype, bf16 fallback): every panel GEMM variant the registry runs
PANEL_VARIANTS = [("bf16-widen", BF16, "float32", False), ("bf16-dot", BF16, "bfloat16", False),
                  ("bf16-dot-fallback", BF16, "bfloat16", True), ("f16-widen", np.float16, "float32", False),
                  ("f16-as-f16", np.float16, "float16", False), ("f32-in-bf16-set", np.float32, "bfloat16", False)]


def panel_kernels(monkeypatch, compute: str, fallback: bool, k_block: int = 0, tile_rows: int = 0,
                  threads: int = 2) -> CpuKernels:
    """CPU kernels for `compute` whose every panel op runs with these parameters."""
    monkeypatch.setenv(registry.BF16_FALLBACK_ENV, "1" if fallback else "0")
    params = with_panel_values(expert_params(sku.GEMM_PREPACKED, k_block, 0, threads), threads=threads,
                               k_block=k_block, tile_rows=tile_rows)
    return CpuKernels(params, compute)


def with_panel_values(params, **values: int):
    """params with `values` set for every panel op in both classes."""
    for op in dict.fromkeys(registry.PANEL_OPS.values()):
        for cls in ("decode", "prefill"):
            params.ops.setdefault(op, {}).setdefault(cls, {}).update(values)
    return params


def routed_inputs(rng, n: int, out: int, inner: int, dtype, bias: bool):
    """x, and wl, wv in `dtype` (float32 values for the oracle: bf16/fp16-exact), bv."""
    wl, wv = (normal(rng, out, inner).astype(dtype) for _ in range(2))
    return normal(rng, n, inner), wl, wv, normal(rng, out) if bias else None


def run_routed(kernels, x, num_language, wl, wv, bv, linear: bool = False) -> np.ndarray:
    pl, pv = kernels.prepare_weight(wl), kernels.prepare_weight(wv)
    if linear:
        return kernels.linear(Tensor(x), pl, None if bv is None else Tensor(bv)).asnumpy()
    return kernels.expert_linear(Tensor(x), num_language, pl, pv, None if bv is None else Tensor(bv)).asnumpy()


@needs_cpu
@pytest.mark.parametrize("variant", PANEL_VARIANTS, ids=[v[0] for v in PANEL_VARIANTS])
@pytest.mark.parametrize("n,num_language", [(1, 1), (1, 0), (8, 3), (64, 64), (70, 33), (2048, 700)])
@pytest.mark.parametrize("out,inner", [(32, 77), (96, 64), (160, 301)])
@pytest.mark.parametrize("k_block", [0, 37])
@pytest.mark.parametrize("bias", [True, False])
def test_panel_variants_match_their_reference(monkeypatch, variant, n, num_language, out, inner, k_block, bias):
    """Every variant against its composite (reference.widened_expert_linear: widened weights, x rounded to bf16
    for the bf16 dot): odd `in`, odd k_block (16-bit panels take it up to even), decode to prefill token counts."""
    _, dtype, compute, fallback = variant
    kernels = panel_kernels(monkeypatch, compute, fallback, k_block)
    rng = np.random.default_rng(n + out + inner + k_block)
    x, wl, wv, bv = routed_inputs(rng, n, out, inner, dtype, bias)
    expected = run_routed(get_kernels("reference", compute_dtype=compute), x, num_language, wl, wv, bv)
    got = run_routed(kernels, x, num_language, wl, wv, bv)
    assert got.shape == (n, out)
    assert_close(got, expected)
    assert_close(run_routed(kernels, x, 0, wl, wl, bv, linear=True), run_routed(REF, x, 0, wl, wl, bv, linear=True)
                 if compute == "float32" else run_routed(get_kernels("reference", compute_dtype=compute), x, 0, wl,
                                                          wl, bv, linear=True))


@needs_cpu
@pytest.mark.parametrize("dtype", [BF16, np.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("k_block,tile_rows", [(0, 0), (64, 8), (512, 5), (1024, 12)])
@pytest.mark.parametrize("n,inner", [(1, 4096), (8, 4097), (300, 1030)])
def test_widened_panels_are_bit_identical_to_float32_panels(monkeypatch, dtype, k_block, tile_rows, n, inner):
    """fp32 math over 16-bit panels = the float32 GEMM over the widened weights, bit for bit (same k_block)."""
    rng = np.random.default_rng(inner + k_block)
    x, wl, wv, bv = routed_inputs(rng, n, 96, inner, dtype, True)
    widened = panel_kernels(monkeypatch, "float32", False, k_block, tile_rows)
    reference_tiles = panel_kernels(monkeypatch, "float32", False, k_block, 8)
    got = run_routed(widened, x, n // 3, wl, wv, bv)
    f32 = run_routed(reference_tiles, x, n // 3, wl.astype(np.float32), wv.astype(np.float32), bv)
    np.testing.assert_array_equal(got, f32)


@needs_cpu
@pytest.mark.parametrize("k_block,tile_rows", [(0, 0), (64, 3), (1024, 12)])
@pytest.mark.parametrize("n,inner", [(1, 4096), (9, 333), (200, 1030)])
def test_bf16_dot_fallback_is_bit_identical(monkeypatch, k_block, tile_rows, n, inner):
    """vdpbf16ps and its fallback (FMA of the odd k, then the even k, of each pair): the same bits, also for
    activations that round to infinity or are denormal (flushed to zero by the rounding) and for any tile."""
    monkeypatch.setenv(registry.AMX_ENV, "0")  # vdpbf16ps itself (AMX rounds its sums otherwise)
    rng = np.random.default_rng(n + inner)
    x, wl, wv, bv = routed_inputs(rng, n, 64, inner, BF16, True)
    x[0, :3] = [3.4e38, -1e-40, 1e-39]
    native = run_routed(panel_kernels(monkeypatch, "bfloat16", False, k_block, tile_rows), x, n // 2, wl, wv, bv)
    fallback = run_routed(panel_kernels(monkeypatch, "bfloat16", True, k_block, 8), x, n // 2, wl, wv, bv)
    np.testing.assert_array_equal(native, fallback)
    assert np.isinf(native[0]).any() or np.isnan(native[0]).any()


@needs_cpu
@pytest.mark.parametrize("n,num_language", [(1, 1), (8, 3), (16, 16), (33, 17), (70, 0), (300, 131), (2048, 700)])
@pytest.mark.parametrize("out,inner", [(32, 64), (160, 1024), (96, 2816)])  # k in whole AMX tiles (32 for bf16)
def test_bf16_amx_tiles_match_the_reference(monkeypatch, n, num_language, out, inner):
    """All tokens on AMX tiles (tdpbf16ps, the last block zero-padded): the reference composite (x
    rounded to bf16, fp32 sums) to fp32 rounding, and the AVX-512 tiles within it (the sums' order differs)."""
    if not CPU.ops.has_amx:
        pytest.skip("this CPU has no AMX tiles")
    rng = np.random.default_rng(n + out + inner)
    x, wl, wv, bv = routed_inputs(rng, n, out, inner, BF16, True)
    expected = run_routed(get_kernels("reference", compute_dtype="bfloat16"), x, num_language, wl, wv, bv)
    monkeypatch.setenv(registry.AMX_ENV, "0")
    avx512 = run_routed(panel_kernels(monkeypatch, "bfloat16", False), x, num_language, wl, wv, bv)
    monkeypatch.setenv(registry.AMX_ENV, "1")
    amx = panel_kernels(monkeypatch, "bfloat16", False)
    got = run_routed(amx, x, num_language, wl, wv, bv)
    assert_close(got, expected)
    assert_close(got, avx512)
    assert_close(run_routed(amx, x, 0, wl, wl, bv, linear=True),
                 run_routed(get_kernels("reference", compute_dtype="bfloat16"), x, 0, wl, wl, bv, linear=True))


@needs_cpu
@pytest.mark.parametrize("compute,quantization", [("bfloat16", None), ("bfloat16", "w8a16"), ("float32", "w8a8")])
def test_a_token_s_projection_does_not_depend_on_its_batch(compute, quantization):
    """The same bits for a row computed alone, with 7 others, with 47 others, or at any position of a long call:
    batch composition, chunked prefill and cached prefixes never change a token's result (on AMX too)."""
    rng = np.random.default_rng(3)
    x = normal(rng, 70, 1024)
    w = (normal(rng, 96, 1024) * 0.05).astype(BF16 if quantization is None else np.float32)
    kernels = get_kernels("cpu", compute_dtype=compute, quantization=quantization)
    wp = kernels.prepare_weight(w)
    whole = kernels.linear(Tensor(x), wp).asnumpy()
    for start, count in ((5, 1), (0, 8), (17, 48), (61, 9)):
        part = kernels.linear(Tensor(x[start:start + count]), wp).asnumpy()
        np.testing.assert_array_equal(part, whole[start:start + count])


def panel_op_kernels(compute: str, quantization: str | None, **values: int) -> CpuKernels:
    """CPU kernels over the default parameters with `values` set for every panel op in both classes."""
    return CpuKernels(with_panel_values(load_params(path="/nonexistent"), **values), compute, quantization)


@needs_cpu
@pytest.mark.parametrize("compute,quantization", [("bfloat16", None), ("bfloat16", "w8a16"), ("float32", "w8a8")])
def test_a_projection_on_one_thread_gives_its_threaded_bits(compute, quantization):
    """parallel_min_work only decides whether a call takes its threads: the same bits either way."""
    rng = np.random.default_rng(5)
    x, w = normal(rng, 9, 512), normal(rng, 256, 512) * 0.05
    threaded = panel_op_kernels(compute, quantization, threads=2, parallel_min_work=0)
    single = panel_op_kernels(compute, quantization, threads=2, parallel_min_work=1 << 30)
    wp = threaded.prepare_weight(w.astype(BF16) if quantization is None else w)
    np.testing.assert_array_equal(threaded.linear(Tensor(x), wp).asnumpy(), single.linear(Tensor(x), wp).asnumpy())


@needs_cpu
@pytest.mark.parametrize("compute,quantization", [("float32", None), ("bfloat16", None), ("bfloat16", "w8a16"),
                                                  ("float32", "w8a8")])
def test_a_projection_gives_the_same_bits_with_and_without_prefetching(compute, quantization):
    """prefetch_rows only decides whether the tiles prefetch the next panel slice: the same bits either way, over
    several k blocks and panels on two threads."""
    rng = np.random.default_rng(9)
    x, w = normal(rng, 9, 1000), normal(rng, 256, 1000) * 0.05
    prefetching = panel_op_kernels(compute, quantization, threads=2, parallel_min_work=0, k_block=256,
                                   prefetch_rows=0)
    streaming = panel_op_kernels(compute, quantization, threads=2, parallel_min_work=0, k_block=256,
                                 prefetch_rows=1 << 30)
    wp = prefetching.prepare_weight(w if quantization else w.astype(BF16))
    np.testing.assert_array_equal(prefetching.linear(Tensor(x), wp).asnumpy(),
                                  streaming.linear(Tensor(x), wp).asnumpy())


@needs_cpu
@pytest.mark.parametrize("k", [1024, 1023])
def test_w8a16_few_token_tiles_give_the_many_token_bits(k):
    """Up to widen_rows tokens (8 here), w8a16's int8 panels under bf16 products skip the bf16 pairs
    (i8_dot_order_tile): the same bits as the tiles over bf16 pairs that larger calls take, odd k included."""
    rng = np.random.default_rng(4)
    x, w = normal(rng, 24, k), normal(rng, 64, k) * 0.05
    kernels = panel_op_kernels("bfloat16", "w8a16", widen_rows=8)
    wp = kernels.prepare_weight(w)
    whole = kernels.linear(Tensor(x), wp).asnumpy()
    for count in range(1, 9):
        np.testing.assert_array_equal(kernels.linear(Tensor(x[24 - count:]), wp).asnumpy(), whole[24 - count:])


@needs_cpu
def test_has_amx_needs_the_cpu_flags():
    flags = Path("/proc/cpuinfo").read_text(encoding="utf-8") if Path("/proc/cpuinfo").is_file() else ""
    if CPU.ops.has_amx:  # else the CPU lacks them, or the kernel did not grant the tile state
        assert all(f" {f}" in flags for f in ("amx_tile", "amx_bf16", "amx_int8"))


@needs_cpu
def test_bf16_dot_rounds_the_activations():
    """The bf16 dot differs from the widened math by the rounding of x alone: equal to fp32 math on bf16-exact x."""
    rng = np.random.default_rng(2)
    x, wl, wv, bv = routed_inputs(rng, 16, 64, 96, BF16, True)
    dot, widened = get_kernels("cpu", compute_dtype="bfloat16"), get_kernels("cpu")
    exact = x.astype(BF16).astype(np.float32)
    assert_close(run_routed(dot, exact, 5, wl, wv, bv), run_routed(widened, exact, 5, wl, wv, bv))
    assert not np.allclose(run_routed(dot, x, 5, wl, wv, bv), run_routed(widened, x, 5, wl, wv, bv), rtol=1e-5)


@needs_cpu
def test_has_bf16_dot_follows_the_cpu():
    flags = Path("/proc/cpuinfo").read_text(encoding="utf-8") if Path("/proc/cpuinfo").is_file() else ""
    assert CPU.ops.has_bf16_dot == (" avx512_bf16" in flags)


@needs_cpu
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_prepare_weight_keeps_the_storage_dtype(backend):
    """Panels in the weight's dtype (no float32 copy), plain where the rows are no whole panels (then widened per
    call); other dtypes are taken as float32; a 16-bit dtype the compute dtype cannot use is refused at load."""
    kernels = get_kernels(backend, compute_dtype="bfloat16")
    rng = np.random.default_rng(4)
    x = normal(rng, 3, 9)
    for dtype, ms_dtype, panel_shape in ((BF16, ms.bfloat16, (2, 5, 32, 2)), (np.float32, ms.float32, (2, 9, 32))):
        w = normal(rng, 64, 9).astype(dtype)
        prepared = kernels.prepare_weight(w)
        assert prepared.dtype == ms_dtype
        assert prepared.shape == (panel_shape if backend == "cpu" else (64, 9))
        odd = kernels.prepare_weight(normal(rng, 48, 9).astype(dtype))
        assert odd.shape == (48, 9) and odd.dtype == ms_dtype
        expected = x.astype(BF16).astype(np.float32) if dtype == BF16 else x
        assert_close(kernels.linear(Tensor(x), odd).asnumpy(), expected @ odd.asnumpy().astype(np.float32).T)
    assert kernels.prepare_weight(np.ones((32, 4))).dtype == ms.float32
    with pytest.raises(ValueError, match="cannot be computed in bfloat16"):
        kernels.prepare_weight(np.ones((32, 4), np.float16))
    with pytest.raises(ValueError, match="cannot be computed in float16"):
        get_kernels(backend, compute_dtype="float16").prepare_weight(np.ones((32, 4), BF16))
    with pytest.raises(ValueError, match="unknown compute dtype"):
        get_kernels(backend, compute_dtype="int8")


@needs_cpu
def test_expert_linear_rejects_mismatched_panels():
    """The kernel's statuses: 2 for dtypes (experts of two dtypes, 16-bit [out, in], bf16 dot on fp16 panels),
    3 for shapes (a bf16 panel in the k-major layout, panels over another `in`)."""
    from kernels.ops import pack_k_major, pack_weight
    rng = np.random.default_rng(6)
    x, w = Tensor(normal(rng, 4, 10)), normal(rng, 32, 10)
    as_tensor = lambda a: Tensor.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    bf16, f16, f32 = (as_tensor(pack_weight(w.astype(d))) for d in (BF16, np.float16, np.float32))
    config = lambda dot=0: Tensor(np.array([2, 0, 1, 4, 0, 0, dot, 0, 0], np.int32))  # noqa: E731
    bias = Tensor(np.zeros(1, np.float32))
    for wl, wv, cfg, status in ((bf16, f32, config(), 2), (f16, f16, config(1), 2),
                                (as_tensor(w.astype(BF16)), as_tensor(w.astype(BF16)), config(), 2),
                                (as_tensor(pack_k_major(w.astype(BF16))), bf16, config(), 3),
                                (as_tensor(pack_weight(normal(rng, 32, 12).astype(BF16))),) * 2 + (config(), 3)):
        with pytest.raises(RuntimeError, match=f"is {status}"):
            CPU.ops.expert_linear(x, wl, wv, bias, cfg).asnumpy()
    assert CPU.ops.expert_linear(x, bf16, bf16, bias, config(1)).shape == (4, 32)  # the well-formed call


@needs_cpu
@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_bf16_panels_inside_jit(compute):
    rng = np.random.default_rng(8)
    kernels = get_kernels("cpu", compute_dtype=compute)
    x, wl, wv, bv = routed_inputs(rng, 6, 64, 40, BF16, True)
    pl, pv, b = kernels.prepare_weight(wl), kernels.prepare_weight(wv), Tensor(bv)

    @ms.jit
    def project(x):
        return kernels.expert_linear(x, 2, pl, pv, b), kernels.linear(x, pl)

    routed, dense = project(Tensor(x))
    np.testing.assert_array_equal(routed.asnumpy(), kernels.expert_linear(Tensor(x), 2, pl, pv, b).asnumpy())
    np.testing.assert_array_equal(dense.asnumpy(), kernels.linear(Tensor(x), pl).asnumpy())


# ---------------------------------------------------------------- the layer's elementwise steps, residual adds

@needs_cpu
@pytest.mark.parametrize("n,d", [(1, 64), (3, 1000), (700, 1024)])  # 700 x 1024: two threads
def test_rms_norm_matches_reference(n, d):
    rng = np.random.default_rng(n + d)
    x, w = Tensor(normal(rng, n, d) * 3), Tensor(normal(rng, d))
    assert_close(CPU.rms_norm(x, w, 1e-5).asnumpy(), REF.rms_norm(x, w, 1e-5).asnumpy())
    tiny = Tensor(np.full((2, d), 1e-4, np.float32))  # eps dominates: the kernel must add it, not drop it
    assert_close(CPU.rms_norm(tiny, w, 1e-2).asnumpy(), REF.rms_norm(tiny, w, 1e-2).asnumpy())


@needs_cpu
@pytest.mark.parametrize("n,f", [(1, 16), (5, 2816), (300, 1408)])
def test_swiglu_matches_reference(n, f):
    rng = np.random.default_rng(n + f)
    gate_up = Tensor(np.concatenate([normal(rng, n, f) * 6, normal(rng, n, f)], 1))  # gates well into both tails
    got = CPU.swiglu(gate_up).asnumpy()
    assert got.shape == (n, f)
    assert_close(got, REF.swiglu(gate_up).asnumpy())


@needs_cpu
@pytest.mark.parametrize("n,f", [(1, 5), (7, 1792), (300, 1537)])
def test_gelu_matches_reference(n, f):
    """The exact GELU against MindSpore's (erf form): both tails, zero, and a tail of the row off the vector width."""
    rng = np.random.default_rng(n + f)
    x = normal(rng, n, f) * 4
    x[0, :5] = [0.0, -0.0, 12.0, -12.0, 1e-30][:min(5, f)]
    got = CPU.gelu(Tensor(x)).asnumpy()
    assert got.shape == (n, f)
    np.testing.assert_allclose(got, REF.gelu(Tensor(x)).asnumpy(), rtol=1e-5, atol=5e-7)


@needs_cpu
@pytest.mark.parametrize("n,num_language", [(1, 1), (9, 4), (70, 0), (300, 131)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("k_block", [0, 64])
def test_expert_linear_adds_a_residual(n, num_language, dtype, k_block):
    """residual + the routed products, for every row (the decoder's fused residual add), over k blocks too."""
    kernels = CpuKernels(expert_params(sku.GEMM_PREPACKED, k_block, 0), compute_dtype=dtype)
    rng = np.random.default_rng(n)
    x, residual = normal(rng, n, 160), normal(rng, n, 96)
    wl, wv = (normal(rng, 96, 160).astype(CACHE_DTYPES[dtype]) for _ in range(2))
    pl, pv = kernels.prepare_weight(wl), kernels.prepare_weight(wv)
    expected = residual + kernels.expert_linear(Tensor(x), num_language, pl, pv, None).asnumpy()
    got = kernels.expert_linear(Tensor(x), num_language, pl, pv, None, residual=Tensor(residual)).asnumpy()
    assert_close(got, expected)
    ref = REF if dtype == "float32" else get_kernels("reference", compute_dtype=dtype)
    assert_close(ref.expert_linear(Tensor(x), num_language, Tensor(wl), Tensor(wv), None,
                                   residual=Tensor(residual)).asnumpy(), expected, rtol=1e-4)
    with pytest.raises(ValueError, match="bias and a residual"):
        kernels.expert_linear(Tensor(x), num_language, pl, pv, Tensor(normal(rng, 96)), residual=Tensor(residual))


@needs_cpu
def test_layer_steps_inside_jit_match_eager():
    """The AOT ops serve rms_norm, swiglu and the residual projection inside jit; eagerly, the pyboost twins."""
    rng = np.random.default_rng(3)
    kernels = CpuKernels(expert_params(sku.GEMM_PREPACKED, 0, 0))
    x, w, wl = Tensor(normal(rng, 5, 64)), Tensor(normal(rng, 64)), kernels.prepare_weight(normal(rng, 128, 64))
    wd = kernels.prepare_weight(normal(rng, 64, 64))

    def block(x):
        gate_up = kernels.expert_linear(kernels.rms_norm(x, w, 1e-5), 5, wl, wl, None)
        return kernels.expert_linear(kernels.swiglu(gate_up), 5, wd, wd, None, residual=x)

    np.testing.assert_array_equal(ms.jit(block)(x).asnumpy(), block(x).asnumpy())


# ---------------------------------------------------------------- inside jit

@needs_cpu
def test_kernels_inside_jit():
    rng = np.random.default_rng(5)
    batch = make_paged_batch([20, 9], [6, 1], 4, rng, shuffle=True)
    n, heads, kv, d = len(batch.seq_index), 4, 2, 16
    q, k, v = normal(rng, n, heads, d), normal(rng, n, kv, d), normal(rng, n, kv, d)
    key0, value0 = normal(rng, batch.num_slots, kv, d), normal(rng, batch.num_slots, kv, d)
    cos, sin = rope_table(default_inv_freq(d, 10000.0), 64)
    x, wl, wv, bv = normal(rng, n, 24), normal(rng, 12, 24), normal(rng, 12, 24), normal(rng, 12)
    i32 = lambda a: Tensor(np.asarray(a, np.int32))  # noqa: E731
    meta = (i32(batch.slot_mapping), i32(batch.seq_index), i32(batch.token_position),
            i32(pad_block_tables(batch.block_tables)), i32(batch.context_lens))
    positions = i32(batch.token_position)

    cos_t, sin_t, wl_t, wv_t, bv_t = Tensor(cos), Tensor(sin), Tensor(wl), Tensor(wv), Tensor(bv)

    def step(kernels, q, k, q_copy, k_copy, v, key_cache, value_cache, x):
        # rope works in place: the fused call gets its own copies of q and k
        q, k = kernels.rope(q, k, positions, cos_t, sin_t)
        out = kernels.paged_attention(q, k, v, key_cache, value_cache, *meta, batch.block_size)
        fused = kernels.paged_attention(q_copy, k_copy, v, key_cache, value_cache, *meta, batch.block_size,
                                        rope=(positions, cos_t, sin_t))
        return out, fused, kernels.expert_linear(x, 3, wl_t, wv_t, bv_t)

    @ms.jit
    def jitted_step(*args):
        return step(CPU, *args)

    results = []
    for kernels in (CPU, REF):
        caches = [Parameter(Tensor(c.copy()), name=f"c{i}", requires_grad=False) for i, c in enumerate((key0, value0))]
        args = (Tensor(q.copy()), Tensor(k.copy()), Tensor(q.copy()), Tensor(k.copy()), Tensor(v), *caches,
                Tensor(x))
        out, fused, y = jitted_step(*args) if kernels is CPU else step(REF, *args)
        results.append((out.asnumpy(), y.asnumpy(), caches[0].asnumpy(), caches[1].asnumpy(), fused.asnumpy()))
    (out, y, keys, values, fused), (ref_out, ref_y, ref_keys, ref_values, _) = results
    assert_close(out, ref_out)
    assert_close(fused, ref_out)
    assert_close(y, ref_y)
    np.testing.assert_array_equal(keys, ref_keys)
    np.testing.assert_array_equal(values, ref_values)


@needs_cpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_paged_attention_inside_jit_with_16bit_caches(dtype):
    """Inside jit the caches' dtype reaches the kernel too: the same outputs and cache bits as eagerly."""
    rng = np.random.default_rng(6)
    batch = make_paged_batch([20, 9], [6, 1], 4, rng, shuffle=True)
    n, heads, kv, d = len(batch.seq_index), 4, 2, 16
    qkv = Tensor(normal(rng, n, heads + 2 * kv, d))
    key0, value0 = normal(rng, batch.num_slots, kv, d), normal(rng, batch.num_slots, kv, d)
    i32 = lambda a: Tensor(np.asarray(a, np.int32))  # noqa: E731
    meta = (i32(batch.slot_mapping), i32(batch.seq_index), i32(batch.token_position),
            i32(pad_block_tables(batch.block_tables)), i32(batch.context_lens))

    def step(qkv, key_cache, value_cache):
        return CPU.paged_attention(qkv, None, None, key_cache, value_cache, *meta, batch.block_size)

    results = []
    for run in (step, ms.jit(step)):
        caches = [cache_parameter(c, dtype, f"j{i}") for i, c in enumerate((key0, value0))]
        out = run(qkv, *caches)
        results.append((out.asnumpy(), cache_bits(caches[0]), cache_bits(caches[1])))
    for eager, jitted in zip(*results):
        np.testing.assert_array_equal(jitted, eager)


@needs_cpu
def test_write_kv_inside_jit_needs_its_token():
    cache = Parameter(Tensor(np.zeros((8, 1, 4), np.float32)), name="jit_cache", requires_grad=False)
    values = Tensor(np.ones((2, 1, 4), np.float32))
    slots = Tensor(np.array([1, 6], np.int32))

    @ms.jit
    def write(cache, slots, values, x):
        done = CPU.write_kv(cache, slots, values)
        return ops.depend(x + 1, done)

    write(cache, slots, values, Tensor(np.zeros(1, np.float32)))
    assert cache.asnumpy()[[1, 6]].sum() == 8 and cache.asnumpy().sum() == 8


# ---------------------------------------------------------------- registry

def test_registry_backends(monkeypatch):
    monkeypatch.delenv("COGVLM2_KERNELS", raising=False)
    assert isinstance(get_kernels("reference"), ReferenceKernels)
    if CPU is not None:
        assert get_kernels("auto").backend == "cpu"
    monkeypatch.setenv("COGVLM2_KERNELS", "reference")
    assert get_kernels("auto").backend == "reference"
    assert get_kernels("cpu").backend == "reference"  # the variable wins
    monkeypatch.setenv("COGVLM2_KERNELS", "gpu")
    with pytest.raises(ValueError):
        get_kernels()


KERNEL_SET_OPS = ("rope", "write_kv", "paged_attention", "expert_linear", "rms_norm", "swiglu", "gelu", "linear",
                  "kv_cache_shape", "place_kv_cache", "prepare_weight")


def test_kernel_set_protocol_names_the_model_s_ops():
    ops_named = {name for name, value in vars(KernelSet).items() if inspect.isfunction(value) and name[0] != "_"}
    assert ops_named == set(KERNEL_SET_OPS)


@pytest.mark.parametrize("backend", [ReferenceKernels, CpuKernels, AscendKernels])
def test_backends_satisfy_the_kernel_set_protocol(backend):
    """Each op with the protocol's parameters (names, order, defaults), so a call written against it works."""
    for name in KERNEL_SET_OPS:
        expected = [(p.name, p.default) for p in inspect.signature(getattr(KernelSet, name)).parameters.values()]
        actual = [(p.name, p.default) for p in inspect.signature(getattr(backend, name)).parameters.values()]
        assert actual == expected, f"{backend.__name__}.{name}"
    assert isinstance(REF, KernelSet) and (CPU is None or isinstance(CPU, KernelSet))


def test_registry_falls_back_with_a_warning(monkeypatch):
    monkeypatch.delenv("COGVLM2_KERNELS", raising=False)

    def missing():
        raise library.KernelLibraryError("no kernel library (test)")

    import kernels.library as library
    monkeypatch.setattr(library, "_library", None)
    monkeypatch.setattr(library, "find_library", missing)
    registry._kernels.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="no kernel library"):
            kernels = get_kernels("auto")
        assert kernels.backend == "reference"
        with pytest.raises(library.KernelLibraryError):
            get_kernels("cpu")
    finally:
        registry._kernels.cache_clear()


def test_params_from_yaml(tmp_path):
    table = tmp_path / "sku.yaml"
    table.write_text("sku: test\nops:\n  paged_attention:\n    decode: {key_tile: 32}\n", encoding="utf-8")
    params = load_params(sku="test", path=table)
    assert params.get("paged_attention", "decode")["key_tile"] == 32
    assert params.get("paged_attention", "decode")["threads"] == sku.DEFAULT_PARAMS["paged_attention"][
        "decode"]["threads"]
    assert params.source == str(table)
    assert load_params(sku="no-such-sku").source == "defaults"


def test_this_machine_has_a_table():
    sku_id = sku.detect_sku()
    assert sku_id.startswith("cpu-") or sku_id.startswith("ascend")
    params = load_params()
    assert params.sku == sku_id
    if not sku.kernel_table_path(sku_id).is_file():
        pytest.skip(f"no tuned table for {sku_id} (run `cogvlm2 tune`)")
    assert params.source == str(sku.kernel_table_path(sku_id))


def test_detected_sku_format(monkeypatch):
    """cpu-<vendor>-<model>-<isa tier> on this CPU host: the id the registry's table is named by."""
    monkeypatch.delenv(sku.SKU_ENV, raising=False)
    sku.detect_sku_info.cache_clear()
    try:
        parts = sku.detect_sku().split("-")
    finally:
        sku.detect_sku_info.cache_clear()
    assert parts[0] == "cpu" and len(parts) >= 4 and parts[-1] in {tier for _, tier in sku.ISA_TIERS} | {"generic"}


def test_reference_metadata_cache_follows_content():
    """The reference backend reuses its metadata across the layers of a step; a new step's batch must not."""
    rng = np.random.default_rng(9)
    shared = ReferenceKernels(load_params(path="/nonexistent"))
    for context in ([10, 3], [12, 3]):
        batch = make_paged_batch(context, [1, 3], 4, rng)
        q, k, v = normal(rng, 4, 2, 8), normal(rng, 4, 1, 8), normal(rng, 4, 1, 8)
        cache = normal(rng, batch.num_slots, 1, 8)
        out, _, _ = run_paged(shared, q, k, v, cache, cache, batch)
        fresh, _, _ = run_paged(ReferenceKernels(load_params(path="/nonexistent")), q, k, v, cache, cache, batch)
        np.testing.assert_array_equal(out, fresh)


def test_pad_block_tables():
    np.testing.assert_array_equal(pad_block_tables([[1, 2], [3], []]), [[1, 2], [3, 0], [0, 0]])


# ---------------------------------------------------------------- tuning

@needs_cpu
def test_tune_writes_a_table(tmp_path, monkeypatch):
    import argparse

    from kernels import tune
    small = tune.Shape("tiny", 4, 2, 16, 32, 48, (20, 9), (20, 1))
    monkeypatch.setattr(tune, "SHAPES", {"decode": [small], "prefill": [small]})
    monkeypatch.setattr(tune, "GEMM_SHAPES", {"decode": [small], "prefill": []})
    monkeypatch.setattr(tune, "COLD_WEIGHT_BYTES", 1 << 17)  # a few copies of the tiny weights, rotated
    panel = [{"threads": 1, "k_block": 0, "tile_rows": 0}, {"threads": 2, "k_block": 16, "tile_rows": 3}]
    monkeypatch.setattr(tune, "CANDIDATES", {
        **{op: {c: [{"threads": 1}, {"threads": 2}] for c in ("decode", "prefill")} for op in ("rope",) + tune.ROW_OPS},
        "paged_attention": {c: [dict(sku.DEFAULT_PARAMS["paged_attention"][c]),
                                {"threads": 1, "query_tile": 2, "key_tile": 16, "parallel_min_work": 0, "amx": 1}]
                            for c in ("decode", "prefill")},
        "expert_linear": {c: [{"threads": 1, "gemm": g, "k_block": 0, "n_block": 0} for g in range(5)]
                          for c in ("decode", "prefill")},
        **{op: {c: panel for c in ("decode", "prefill")} for op in tune.PANEL_OPS[1:]},
    })
    parser = argparse.ArgumentParser()
    tune.add_tune_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "table.yaml"
    args = parser.parse_args(["tune", "--out", str(out), "--repeat", "1"])
    assert args.func(args) == 0
    params = load_params(path=out)
    assert set(params.ops) == set(tune.OPS)
    assert params.get("expert_linear", "decode")["gemm"] in range(5)
    assert params.get("expert_linear_bf16_dot", "prefill") in panel
    # decode projections: their chosen candidate refined by a sweep of prefetch_rows
    decode = params.get("expert_linear_bf16_dot", "decode")
    assert decode["prefetch_rows"] in tune.REFINED_DECODE_PARAMS["prefetch_rows"]
    assert {key: value for key, value in decode.items() if key != "prefetch_rows"} in panel
    assert "measurements" in out.read_text(encoding="utf-8")
    assert "best_by_kind" in out.read_text(encoding="utf-8")  # paged attention, timed per cache dtype and math
    assert "bfloat16, bf16 math" in out.read_text(encoding="utf-8")
    for op in tune.PANEL_OPS:  # what sets the bits is shared by both classes
        assert {params.get(op, c)["k_block"] for c in ("decode", "prefill")} == \
            {params.get(op, "decode")["k_block"]}


def test_tune_shares_what_sets_the_results_between_the_classes():
    """decode alone would take k_block 512, prefill alone 1024; together, the k_block cheapest over both."""
    from kernels import tune
    candidates = [{"threads": t, "k_block": k} for k in (512, 1024) for t in (1, 2)]
    decode = tune.Sweep(candidates, ["a"], np.array([[1.0], [1.1], [1.3], [1.4]]))
    prefill = tune.Sweep(candidates, ["b"], np.array([[2.2], [2.1], [2.0], [2.5]]))
    assert tune.choose({"decode": decode, "prefill": prefill}) == {"decode": 0, "prefill": 1}
    prefill.times[2] = 1.0  # now 1024 saves more in prefill than it costs in decode
    assert tune.choose({"decode": decode, "prefill": prefill}) == {"decode": 2, "prefill": 2}


def test_a_table_whose_classes_disagree_on_what_sets_the_results_is_refused(tmp_path):
    table = tmp_path / "table.yaml"
    table.write_text("ops:\n  expert_linear_i8_bf16_dot:\n    decode: {k_block: 1024}\n"
                     "    prefill: {k_block: 512}\n", encoding="utf-8")
    with pytest.raises(ValueError, match="expert_linear_i8_bf16_dot.k_block is 1024 for decode but 512 for prefill"):
        CpuKernels(load_params(path=table))
