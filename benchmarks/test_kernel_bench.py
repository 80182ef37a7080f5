"""pytest-benchmark versions of benchmarks/kernels.py: each CPU kernel and its reference at the bench preset's
decode and prefill shapes (launches are blocking, so each timed call includes the op's whole run): write_kv and
paged attention over float32, bfloat16 and float16 caches; the panel GEMM in each weight dtype and compute dtype,
and its composite, at the QKV projection's shape.

    .venv/bin/pytest benchmarks/test_kernel_bench.py --benchmark-group-by=param:case
"""
from __future__ import annotations

import sys
from pathlib import Path

# This folder's kernels.py would shadow the `kernels` package when pytest puts the folder first on sys.path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
if "kernels" in sys.modules and not hasattr(sys.modules["kernels"], "__path__"):
    del sys.modules["kernels"]

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from cogvlm2.runtime import configure_mindspore  # noqa: E402

configure_mindspore()

from mindspore import Parameter, Tensor  # noqa: E402

from kernels.reference import make_paged_batch  # noqa: E402
from kernels.registry import get_kernels, pad_block_tables  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, HIDDEN, QKV = 16, 4, 64, 1024, (16 + 2 * 4) * 64
BACKENDS = ["cpu", "reference"]
CASES = {"decode": ([512] * 32, [1] * 32), "prefill": ([320], [256])}
CACHE_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def _normal(rng, *shape):
    return Tensor(rng.standard_normal(shape).astype(np.float32))


@pytest.fixture(scope="module")
def kernels():
    try:
        return {"cpu": get_kernels("cpu"), "reference": get_kernels("reference")}
    except Exception as error:  # noqa: BLE001
        pytest.skip(f"CPU kernel library unavailable: {error}")


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    rng = np.random.default_rng(0)
    lens, new = CASES[request.param]
    batch = make_paged_batch(lens, new, 16, rng, shuffle=True)
    n = len(batch.seq_index)
    cache_values = [rng.standard_normal((batch.num_slots, KV_HEADS, HEAD_DIM)).astype(np.float32) for _ in range(2)]
    i32 = lambda a: Tensor.from_numpy(np.ascontiguousarray(a, np.int32))  # noqa: E731
    return {
        "name": request.param, "n": n,
        "q": _normal(rng, n, HEADS, HEAD_DIM), "k": _normal(rng, n, KV_HEADS, HEAD_DIM),
        "v": _normal(rng, n, KV_HEADS, HEAD_DIM),
        # per cache dtype, a key and a value cache holding the same values (rounded)
        "caches": {name: [Parameter(Tensor.from_numpy(c.astype(dtype)), name=f"bench_{name}{i}", requires_grad=False)
                          for i, c in enumerate(cache_values)] for name, dtype in CACHE_DTYPES.items()},
        "meta": (i32(batch.slot_mapping), i32(batch.seq_index), i32(batch.token_position),
                 i32(pad_block_tables(batch.block_tables)), i32(batch.context_lens), 16),
        "positions": i32(batch.token_position),
        "cos": _normal(rng, 4096, HEAD_DIM), "sin": _normal(rng, 4096, HEAD_DIM),
        "x": _normal(rng, n, HIDDEN), "wl": _normal(rng, QKV, HIDDEN), "wv": _normal(rng, QKV, HIDDEN),
        "bv": _normal(rng, QKV),
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_rope(benchmark, kernels, case, backend):
    k = kernels[backend]
    benchmark(lambda: k.rope(case["q"], case["k"], case["positions"], case["cos"], case["sin"]))


@pytest.mark.parametrize("cache_dtype", list(CACHE_DTYPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_write_kv(benchmark, kernels, case, backend, cache_dtype):
    k = kernels[backend]
    cache = case["caches"][cache_dtype][0]
    benchmark(lambda: k.write_kv(cache, case["meta"][0], case["k"]))


@pytest.mark.parametrize("cache_dtype", list(CACHE_DTYPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_attention(benchmark, kernels, case, backend, cache_dtype):
    k = kernels[backend]
    caches = case["caches"][cache_dtype]
    benchmark(lambda: k.paged_attention(case["q"], case["k"], case["v"], *caches, *case["meta"]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_linear(benchmark, kernels, case, backend):
    k = kernels[backend]
    benchmark(lambda: k.expert_linear(case["x"], case["n"] // 2, case["wl"], case["wv"], case["bv"]))


# (weight dtype, compute dtype) of each panel GEMM variant (kernels.registry.PANEL_OPS)
PANEL_VARIANTS = {"f32": (np.float32, "float32"), "bf16-widen": (ml_dtypes.bfloat16, "float32"),
                  "bf16-dot": (ml_dtypes.bfloat16, "bfloat16"), "f16-widen": (np.float16, "float32")}


@pytest.fixture(scope="module")
def qkv_weight():
    return np.random.default_rng(1).standard_normal((QKV, HIDDEN), dtype=np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", list(PANEL_VARIANTS))
def test_panel_gemm(benchmark, kernels, case, qkv_weight, variant, backend):
    dtype, compute = PANEL_VARIANTS[variant]
    k = get_kernels(backend, compute_dtype=compute)
    w = k.prepare_weight(qkv_weight.astype(dtype))
    benchmark(lambda: k.linear(case["x"], w))
