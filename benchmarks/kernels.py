"""Kernel micro-benchmarks: each CPU kernel against its reference composite, at decode and prefill shapes of the
`bench` preset and of the 19B model's layer (small token counts).

    python benchmarks/kernels.py [--json OUT] [--repeat N] [--only rope,paged_attention,bf16_attention,...]

Kernel and reference calls are interleaved and the minimum over `repeat` rounds is kept: on a shared 2-core
machine the minimum is the figure least disturbed by other processes. Paged attention over 16-bit KV caches
(bfloat16, float16) is also timed against its float32 twin (the same batch and values) and against the reference
composite over the same 16-bit caches. Targets (issue 4) are checked in the same
run: rotary >= 10x, paged attention >= 3x at 32 decodes x 512 context, expert-routed projection over a mixed
batch <= 1.1x a single dense GEMM over the same tokens (the same GEMM without routing; MindSpore's MatMul is
printed beside it). The panel GEMM over 16-bit and int8 weights (--only panel_gemm; ops "gemm <variant>") runs
against its float32 twin (the f32 panels of the same, widened weights) and its composite at 1 to 2048 tokens, with
GF/s (w8a8's int8 dot also against the bf16 dot): bf16 >= 1.7x the twin at 1 and 8 tokens, the bf16 dot >= 1.6x at
2048.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

# Run as a script, this file's folder comes first on sys.path and its name would shadow the `kernels` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

from cogvlm2.runtime import configure_mindspore  # noqa: E402

configure_mindspore()

from mindspore import Parameter, Tensor  # noqa: E402

from kernels.composites import linear  # noqa: E402
from kernels.interface import KernelSet  # noqa: E402
from kernels.reference import make_paged_batch  # noqa: E402
from kernels.registry import AMX_ENV, CpuKernels, get_kernels, pad_block_tables  # noqa: E402


@dataclass(frozen=True)
class Model:
    name: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int


BENCH = Model("bench", 1024, 16, 4, 64, 2816)
COGVLM2_19B = Model("19b", 4096, 32, 8, 128, 14336)
BLOCK_SIZE = 16
HALF_CACHE_DTYPES = {"bf16": ml_dtypes.bfloat16, "fp16": np.float16}


@dataclass
class Result:
    op: str
    model: str
    case: str
    kernel_ms: float
    reference_ms: float
    reference: str = "composite"
    target: str = ""
    passed: bool | None = None
    gflop: float = 0.0  # the kernel's work, for a GF/s figure (panel_gemm)

    @property
    def speedup(self) -> float:
        return self.reference_ms / self.kernel_ms


def time_pair(kernel: Callable, reference: Callable, repeat: int) -> tuple[float, float]:
    """Interleaved runs, minimum of each, in ms; cheap ops get more rounds (up to ~0.5 s of them), since a minimum
    over few rounds of a 0.1 ms op on a shared machine is mostly noise. configure_mindspore() sets blocking
    launches: an op has finished when its call returns, so nothing is read back (asnumpy would add ~60-90 us)."""
    start = time.perf_counter()
    kernel()
    reference()
    rounds = max(repeat, min(400, int(0.5 / max(time.perf_counter() - start, 1e-6))))
    best_k = best_r = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        kernel()
        best_k = min(best_k, time.perf_counter() - start)
        start = time.perf_counter()
        reference()
        best_r = min(best_r, time.perf_counter() - start)
    return best_k * 1e3, best_r * 1e3


def _normal(rng: np.random.Generator, *shape: int) -> Tensor:
    return Tensor(rng.standard_normal(shape).astype(np.float32))


def _rope_table(rng: np.random.Generator, positions: int, head_dim: int) -> tuple[Tensor, Tensor]:
    angle = rng.uniform(0, 6.28, (positions, head_dim // 2)).astype(np.float32)
    return (Tensor(np.concatenate([np.cos(angle)] * 2, 1)), Tensor(np.concatenate([np.sin(angle)] * 2, 1)))


def bench_rope(cpu: KernelSet, ref: KernelSet, m: Model, case: str, n: int, repeat: int,
               rng: np.random.Generator) -> Result:
    q, k = _normal(rng, n, m.heads, m.head_dim), _normal(rng, n, m.kv_heads, m.head_dim)
    cos, sin = _rope_table(rng, 4096, m.head_dim)
    positions = Tensor(rng.integers(0, 4096, n).astype(np.int32))
    kernel_ms, ref_ms = time_pair(lambda: cpu.rope(q, k, positions, cos, sin),
                                  lambda: ref.rope(q, k, positions, cos, sin), repeat)
    return Result("rope", m.name, case, kernel_ms, ref_ms, target=">= 10x")


def bench_layer_steps(cpu: KernelSet, ref: KernelSet, m: Model, case: str, n: int, repeat: int,
                      rng: np.random.Generator) -> list[Result]:
    """The decoder's RMSNorm and SwiGLU between its GEMMs: each one kernel call against its MindSpore composite
    (several ops), the difference being mostly dispatch at decode's few rows."""
    x, w, gate_up = _normal(rng, n, m.hidden), _normal(rng, m.hidden), _normal(rng, n, 2 * m.mlp)
    results = []
    for op, kernel, reference in (("rms_norm", lambda: cpu.rms_norm(x, w, 1e-5), lambda: ref.rms_norm(x, w, 1e-5)),
                                  ("swiglu", lambda: cpu.swiglu(gate_up), lambda: ref.swiglu(gate_up))):
        kernel_ms, ref_ms = time_pair(kernel, reference, repeat)
        results.append(Result(op, m.name, case, kernel_ms, ref_ms, target=">= 3x" if n <= 64 else ""))
    return results


# The vision MLP's fc1 activations: the bench preset's image (16 x 16 patches + cls) x 2048, and 2048 of the
# 19B's 1344x1344 image tokens x 15,360 (the encoder's chunk: cogvlm2/vision.py MLP_ACTIVATIONS_BUDGET).
GELU_CASES = (("bench", "image 257 tokens x 2048", 257, 2048), ("19b", "2048 image tokens x 15360", 2048, 15360))


def bench_gelu(cpu: KernelSet, ref: KernelSet, repeat: int, rng: np.random.Generator) -> list[Result]:
    """The vision encoder's exact GELU: one kernel pass against MindSpore's erf composite."""
    results = []
    for model, case, tokens, width in GELU_CASES:
        x = _normal(rng, tokens, width)
        kernel_ms, ref_ms = time_pair(lambda: cpu.gelu(x), lambda: ref.gelu(x), repeat)
        results.append(Result("gelu", model, case, kernel_ms, ref_ms, target=">= 2x"))
    return results


def _caches(values: list[np.ndarray], dtype=np.float32) -> list[Parameter]:
    return [Parameter(Tensor.from_numpy(np.ascontiguousarray(v.astype(dtype))), name=f"cache{i}",
                      requires_grad=False) for i, v in enumerate(values)]


def _paged_inputs(m: Model, lens: list[int], new: list[int], rng: np.random.Generator, shuffle: bool,
                  dtypes: tuple = (np.float32,)):
    """Inputs of one batch, with one pair of caches per dtype in `dtypes` holding the same values (rounded)."""
    batch = make_paged_batch(lens, new, BLOCK_SIZE, rng, shuffle=shuffle)
    n = len(batch.seq_index)
    shape = (batch.num_slots, m.kv_heads, m.head_dim)
    values = [rng.standard_normal(shape).astype(np.float32) for _ in range(2)]
    caches = [_caches(values, dtype) for dtype in dtypes]
    caches = caches[0] if len(dtypes) == 1 else caches
    i32 = lambda a: Tensor.from_numpy(np.ascontiguousarray(a, np.int32))  # noqa: E731
    meta = (i32(batch.slot_mapping), i32(batch.seq_index), i32(batch.token_position),
            i32(pad_block_tables(batch.block_tables)), i32(batch.context_lens), BLOCK_SIZE)
    qkv = (_normal(rng, n, m.heads, m.head_dim), _normal(rng, n, m.kv_heads, m.head_dim),
           _normal(rng, n, m.kv_heads, m.head_dim))
    return qkv, caches, meta


def bench_paged_attention(cpu: KernelSet, ref: KernelSet, m: Model, case: str, lens: list[int], new: list[int],
                          repeat: int, rng: np.random.Generator, target: str = "") -> Result:
    (q, k, v), (kc, vc), meta = _paged_inputs(m, lens, new, rng, shuffle=True)
    kernel_ms, ref_ms = time_pair(lambda: cpu.paged_attention(q, k, v, kc, vc, *meta),
                                  lambda: ref.paged_attention(q, k, v, kc, vc, *meta), repeat)
    return Result("paged_attention", m.name, case, kernel_ms, ref_ms, target=target)


def bench_paged_cache_dtypes(cpu: KernelSet, ref: KernelSet, m: Model, case: str, lens: list[int], new: list[int],
                             repeat: int, rng: np.random.Generator) -> list[Result]:
    """Each 16-bit cache against its float32 twin (the kernel both times), then against the reference composite."""
    dtypes = (np.float32, *HALF_CACHE_DTYPES.values())
    (q, k, v), caches, meta = _paged_inputs(m, lens, new, rng, shuffle=True, dtypes=dtypes)
    twin = lambda: cpu.paged_attention(q, k, v, *caches[0], *meta)  # noqa: E731
    results = []
    for name, pair in zip(HALF_CACHE_DTYPES, caches[1:]):
        half = lambda pair=pair: cpu.paged_attention(q, k, v, *pair, *meta)  # noqa: E731
        half_ms, twin_ms = time_pair(half, twin, repeat)
        kernel_ms, ref_ms = time_pair(half, lambda pair=pair: ref.paged_attention(q, k, v, *pair, *meta), repeat)
        results += [Result(f"paged_attn {name}", m.name, case, half_ms, twin_ms, reference="float32 cache kernel"),
                    Result(f"paged_attn {name}", m.name, case, kernel_ms, ref_ms)]
    return results


def bench_bf16_attention(m: Model, case: str, lens: list[int], new: list[int], repeat: int,
                         rng: np.random.Generator) -> list[Result]:
    """Compute dtype bfloat16 over a bf16 cache (bf16 math: AMX tiles or vdpbf16ps on the query tiles) against
    float32 math over the same cache (its twin), against itself without AMX where the CPU has it, then against its
    composite (reference.uses_bf16_attention)."""
    (q, k, v), pair, meta = _paged_inputs(m, lens, new, rng, shuffle=True, dtypes=(HALF_CACHE_DTYPES["bf16"],))
    bf16, twin = get_kernels("cpu", compute_dtype="bfloat16"), get_kernels("cpu")
    ref = get_kernels("reference", compute_dtype="bfloat16")
    kernel = lambda: bf16.paged_attention(q, k, v, *pair, *meta)  # noqa: E731
    kernel_ms, twin_ms = time_pair(kernel, lambda: twin.paged_attention(q, k, v, *pair, *meta), repeat)
    _, ref_ms = time_pair(kernel, lambda: ref.paged_attention(q, k, v, *pair, *meta), repeat)
    results = [Result("paged_attn bf16 math", m.name, case, kernel_ms, twin_ms, reference="float32 math kernel")]
    if bf16.ops.has_amx:
        no_amx = without_amx("bfloat16", None)
        amx_ms, avx512_ms = time_pair(kernel, lambda: no_amx.paged_attention(q, k, v, *pair, *meta), repeat)
        results.append(Result("paged_attn bf16 math", m.name, case, amx_ms, avx512_ms, reference="no-AMX tiles"))
    return results + [Result("paged_attn bf16 math", m.name, case, kernel_ms, ref_ms)]


def bench_fused_rope_attention(cpu: KernelSet, ref: KernelSet, m: Model, case: str, lens: list[int],
                               new: list[int], repeat: int, rng: np.random.Generator) -> list[Result]:
    """Rotary fused into paged attention, against the composites and against the two CPU kernels in turn."""
    (q, k, v), (kc, vc), meta = _paged_inputs(m, lens, new, rng, shuffle=True)
    cos, sin = _rope_table(rng, 4096, m.head_dim)
    positions = Tensor(rng.integers(0, 4096, q.shape[0]).astype(np.int32))
    rope = (positions, cos, sin)
    fused = lambda: cpu.paged_attention(q, k, v, kc, vc, *meta, rope=rope)  # noqa: E731

    def separate():
        q2, k2 = cpu.rope(q.copy(), k.copy(), positions, cos, sin)
        return cpu.paged_attention(q2, k2, v, kc, vc, *meta)

    def copies():  # what `separate` spends on protecting the inputs from the in-place rotation
        return q.copy(), k.copy()

    kernel_ms, ref_ms = time_pair(fused, lambda: ref.paged_attention(q, k, v, kc, vc, *meta, rope=rope), repeat)
    fused_ms, separate_ms = time_pair(fused, separate, repeat)
    copy_ms, _ = time_pair(copies, copies, repeat)
    return [Result("attention+rope", m.name, case, kernel_ms, ref_ms),
            Result("attention+rope", m.name, case, fused_ms, separate_ms - copy_ms,
                   reference="rope + attention kernels")]


def bench_write_kv(cpu: KernelSet, ref: KernelSet, m: Model, case: str, n: int, repeat: int,
                   rng: np.random.Generator) -> list[Result]:
    """Into a float32 cache against the composite; into each 16-bit cache against its float32 twin and the
    composite."""
    slots = 4096
    cache_values = rng.standard_normal((slots, m.kv_heads, m.head_dim)).astype(np.float32)
    values = _normal(rng, n, m.kv_heads, m.head_dim)
    slot_mapping = Tensor(rng.permutation(slots)[:n].astype(np.int32))
    twin = _caches([cache_values])[0]
    kernel = lambda cache: lambda: cpu.write_kv(cache, slot_mapping, values)  # noqa: E731
    reference = lambda cache: lambda: ref.write_kv(cache, slot_mapping, values) or cache  # noqa: E731
    results = [Result("write_kv", m.name, case, *time_pair(kernel(twin), reference(twin), repeat))]
    for name, dtype in HALF_CACHE_DTYPES.items():
        cache = _caches([cache_values], dtype)[0]
        results += [Result(f"write_kv {name}", m.name, case, *time_pair(kernel(cache), kernel(twin), repeat),
                           reference="float32 cache kernel"),
                    Result(f"write_kv {name}", m.name, case, *time_pair(kernel(cache), reference(cache), repeat))]
    return results


def bench_expert_linear(cpu: KernelSet, ref: KernelSet, m: Model, case: str, n: int, num_language: int,
                        out_features: int, in_features: int, bias: bool, repeat: int, rng: np.random.Generator,
                        target: bool = True) -> list[Result]:
    """The routed projection against the composite; then against one dense GEMM over all n tokens, both with the
    same GEMM (the cost of routing: the target) and with MindSpore's MatMul (for the record)."""
    x = _normal(rng, n, in_features)
    weights = [rng.standard_normal((out_features, in_features)).astype(np.float32) for _ in range(2)]
    wl, wv = (Tensor(w) for w in weights)  # the checkpoint layout, for the composite and MindSpore's MatMul
    kl, kv = (cpu.prepare_weight(w) for w in weights)  # the layout the engine loads for the kernels
    bv = _normal(rng, out_features) if bias else None
    routed = lambda: cpu.expert_linear(x, num_language, kl, kv, bv)  # noqa: E731
    kernel_ms, ref_ms = time_pair(routed, lambda: ref.expert_linear(x, num_language, wl, wv, bv), repeat)
    routed_ms, dense_ms = time_pair(routed, lambda: cpu.expert_linear(x, n, kl, kl, None), repeat)
    routed2_ms, ms_dense_ms = time_pair(routed, lambda: linear(x, wl), repeat)
    shape = f"{case} {n}x{in_features}->{out_features} ({num_language} text)"
    return [Result("expert_linear", m.name, shape, kernel_ms, ref_ms),
            Result("expert_linear", m.name, shape, routed_ms, dense_ms, reference="dense, same GEMM",
                   target="<= 1.1x dense" if target else ""),
            Result("expert_linear", m.name, shape, routed2_ms, ms_dense_ms, reference="dense MindSpore MatMul")]


BF16 = np.dtype(ml_dtypes.bfloat16)
# (name, stored dtype, compute dtype, quantization): the panel GEMM variants (kernels.registry.PANEL_OPS); the int8
# panels (w8a16's, and w8a8's in k quads) are quantized from the float32 weights
PANEL_VARIANTS = (("bf16 widen", BF16, "float32", None), ("bf16 dot", BF16, "bfloat16", None),
                  ("f16 widen", np.float16, "float32", None), ("i8 widen", np.float32, "float32", "w8a16"),
                  ("i8 bf16 dot", np.float32, "bfloat16", "w8a16"), ("i8 vnni", np.float32, "float32", "w8a8"))
PANEL_TOKENS = (1, 8, 32, 64, 2048)


def panel_gemm_shape(m: Model) -> tuple[str, int, int]:
    """The layer's largest projection of each model: the bench MLP's gate+up, the 19B's down projection."""
    return ("gate_up", 2 * m.mlp, m.hidden) if m is BENCH else ("down", m.hidden, m.mlp)


AMX_VARIANTS = ("bf16 dot", "i8 bf16 dot", "i8 vnni")  # the dot products that take AMX tiles for 16 tokens or more


def without_amx(compute: str, quantization: str | None) -> KernelSet:
    """The CPU kernels with the dot products kept on the AVX-512 tiles (COGVLM2_AMX=0): AMX's twin."""
    before = os.environ.get(AMX_ENV)
    os.environ[AMX_ENV] = "0"
    try:
        return CpuKernels(get_kernels("cpu").params, compute, quantization)
    finally:
        if before is None:
            del os.environ[AMX_ENV]
        else:
            os.environ[AMX_ENV] = before


def with_paired_int8() -> KernelSet:
    """w8a16 under bf16 products with every call's int8 weights paired as bf16 (widen_rows 0): the twin of the
    widened few-token tiles."""
    params = copy.deepcopy(get_kernels("cpu").params)
    for cls in ("decode", "prefill"):
        params.ops["expert_linear_i8_bf16_dot"][cls]["widen_rows"] = 0
    return CpuKernels(params, "bfloat16", "w8a16")


def bench_panel_gemm(m: Model, tokens: int, repeat: int, rng: np.random.Generator) -> list[Result]:
    """Each variant against its float32 twin and its composite, and the twin against its composite, side by side;
    w8a8's int8 dot also against the bf16 dot, and both dots (on AMX tiles where the CPU has them) against the
    AVX-512 tiles alone; w8a16's bf16 dot, where it widens the int8 weights, against pairing them; targets at decode
    (>= 1.7x the twin) and at prefill (bf16 dot >= 1.6x)."""
    name, out, inner = panel_gemm_shape(m)
    w = rng.standard_normal((out, inner), dtype=np.float32)
    x = Tensor(rng.standard_normal((tokens, inner), dtype=np.float32))
    shape = f"{name} M={tokens} {out}x{inner}"
    gflop = 2 * tokens * out * inner / 1e9
    results, kernels = [], {}
    for variant, dtype, compute, quantization in PANEL_VARIANTS:
        stored = w.astype(dtype)
        cpu = get_kernels("cpu", compute_dtype=compute, quantization=quantization)
        ref, twin = get_kernels("reference", compute_dtype=compute, quantization=quantization), get_kernels("cpu")
        wp, wr, wt = cpu.prepare_weight(stored), ref.prepare_weight(stored), twin.prepare_weight(stored.astype(np.float32))
        kernel = kernels[variant] = lambda cpu=cpu, wp=wp: cpu.linear(x, wp)  # noqa: E731
        kernel_ms, twin_ms = time_pair(kernel, lambda: twin.linear(x, wt), repeat)
        target = ">= 1.7x" if tokens in (1, 8) and dtype == BF16 else ">= 1.6x" if tokens == 2048 and compute == \
            "bfloat16" and not quantization else ""
        results.append(Result(f"gemm {variant}", m.name, shape, kernel_ms, twin_ms, "f32 panels", target,
                              gflop=gflop))
        kernel2_ms, ref_ms = time_pair(kernel, lambda: ref.linear(x, wr), repeat)
        results.append(Result(f"gemm {variant}", m.name, shape, kernel2_ms, ref_ms, "composite", gflop=gflop))
        if variant in AMX_VARIANTS and cpu.ops.has_amx and tokens >= 16:
            avx512 = without_amx(compute, quantization)
            amx_ms, avx512_ms = time_pair(kernel, lambda: avx512.linear(x, wp), repeat)
            results.append(Result(f"gemm {variant}", m.name, shape, amx_ms, avx512_ms, "no-AMX tiles", gflop=gflop))
        if variant == "i8 bf16 dot" and tokens <= cpu.params.get("expert_linear_i8_bf16_dot", "decode")["widen_rows"]:
            paired = with_paired_int8()
            widened_ms, paired_ms = time_pair(kernel, lambda: paired.linear(x, wp), repeat)
            results.append(Result(f"gemm {variant}", m.name, shape, widened_ms, paired_ms, "paired int8", gflop=gflop))
    int8_ms, bf16_ms = time_pair(kernels["i8 vnni"], kernels["bf16 dot"], repeat)
    results.append(Result("gemm i8 vnni", m.name, shape, int8_ms, bf16_ms, "bf16 dot panels", gflop=gflop))
    twin, ref = get_kernels("cpu"), get_kernels("reference")
    wt, wr = twin.prepare_weight(w), ref.prepare_weight(w)
    twin_ms, ref_ms = time_pair(lambda: twin.linear(x, wt), lambda: ref.linear(x, wr), repeat)
    return results + [Result("gemm f32", m.name, shape, twin_ms, ref_ms, "composite", gflop=gflop)]


def print_panel_gflops(results: list[Result]) -> None:
    """GF/s of the panel GEMMs, a line per shape and token count (each variant's best run over its pairs)."""
    rows: dict[tuple[str, str], dict[str, float]] = {}
    for r in results:
        if r.gflop:
            row = rows.setdefault((r.model, r.case), {})
            row[r.op] = max(row.get(r.op, 0.0), r.gflop / r.kernel_ms * 1e3)
    if rows:
        names = ["gemm f32"] + [f"gemm {v[0]}" for v in PANEL_VARIANTS]
        print(f"\n{'GF/s':34} " + " ".join(f"{n[5:]:>11}" for n in names))
        for (model, shape), row in rows.items():
            print(f"{model + ' ' + shape:34} " + " ".join(f"{row.get(n, float('nan')):11.1f}" for n in names))


def run(repeat: int, only: set[str] | None) -> list[Result]:
    cpu, ref = get_kernels("cpu"), get_kernels("reference")
    rng = np.random.default_rng(0)
    want = lambda op: only is None or op in only  # noqa: E731
    results: list[Result] = []
    for m, decode, prefill in ((BENCH, 32, 512), (COGVLM2_19B, 8, 128)):
        if want("rope"):
            results.append(bench_rope(cpu, ref, m, f"decode {decode} tokens", decode, repeat, rng))
            results.append(bench_rope(cpu, ref, m, f"prefill {prefill} tokens", prefill, repeat, rng))
        if want("rms_norm") or want("swiglu"):
            for tokens in (decode, prefill):
                results += [r for r in bench_layer_steps(cpu, ref, m, f"{tokens} tokens", tokens, repeat, rng)
                            if want(r.op)]
        if want("gelu") and m is BENCH:
            results += bench_gelu(cpu, ref, repeat, rng)
        if want("write_kv"):
            results += bench_write_kv(cpu, ref, m, f"decode {decode} tokens", decode, repeat, rng)
            results += bench_write_kv(cpu, ref, m, f"prefill {prefill} tokens", prefill, repeat, rng)
        if want("paged_attention"):
            results.append(bench_paged_attention(cpu, ref, m, f"decode {decode} x 512 context", [512] * decode,
                                                 [1] * decode, repeat, rng,
                                                 ">= 3x" if m is BENCH and decode == 32 else ""))
            results.append(bench_paged_attention(cpu, ref, m, f"prefill 1 x {prefill}", [prefill], [prefill],
                                                 repeat, rng))
            mixed_lens = [256] * (decode // 2) + [prefill + 40]
            mixed_new = [1] * (decode // 2) + [prefill]
            results.append(bench_paged_attention(cpu, ref, m, f"mixed {decode // 2} decodes + chunk {prefill} "
                                                 "from mid-block", mixed_lens, mixed_new, repeat, rng))
            for lens, new, case in (([128] * 8, [1] * 8, "decode 8 x 128 context"),
                                    ([512] * decode, [1] * decode, f"decode {decode} x 512 context")):
                results += bench_fused_rope_attention(cpu, ref, m, case, lens, new, repeat, rng)
            context = 512 if m is BENCH else 2048  # long enough for the KV bytes read to dominate
            for lens, new, case in (([context] * decode, [1] * decode, f"decode {decode} x {context} context"),
                                    (mixed_lens, mixed_new, f"mixed {decode // 2} decodes + chunk {prefill}")):
                results += bench_paged_cache_dtypes(cpu, ref, m, case, lens, new, repeat, rng)
        if want("paged_attention") or want("bf16_attention"):
            long_prefill = 2048 if m is BENCH else 512
            results += bench_bf16_attention(m, f"prefill 1 x {long_prefill}", [long_prefill], [long_prefill],
                                            max(3, repeat // 5), rng)
        if want("expert_linear"):
            qkv = (m.heads + 2 * m.kv_heads) * m.head_dim
            results += bench_expert_linear(cpu, ref, m, "qkv decode", decode, decode, qkv, m.hidden, True,
                                           repeat, rng)
            # a mixed prefill chunk (image + text tokens): compute-bound, where routing should cost nothing
            tokens, slow = (512, repeat) if m is BENCH else (256, max(3, repeat // 5))
            results += bench_expert_linear(cpu, ref, m, "qkv mixed", tokens, tokens // 4, qkv, m.hidden, True,
                                           slow, rng)
            results += bench_expert_linear(cpu, ref, m, "mlp-up mixed", tokens, tokens // 4, m.mlp, m.hidden,
                                           False, slow, rng)
            # a small mixed batch: memory-bound, routing must stream both experts' weights
            small = 32 if m is BENCH else 16
            results += bench_expert_linear(cpu, ref, m, "qkv small mixed", small, small // 2, qkv, m.hidden, True,
                                           repeat, rng, target=False)
        if want("panel_gemm"):
            for tokens in PANEL_TOKENS:
                slow = tokens >= 1024 and m is not BENCH  # ~1 s a call
                results += bench_panel_gemm(m, tokens, max(3, repeat // 5) if slow else repeat, rng)
    for r in results:
        if r.target.startswith(">="):
            r.passed = r.speedup >= float(r.target.split()[1].rstrip("x"))
        elif r.target.startswith("<="):
            r.passed = r.kernel_ms <= 1.1 * r.reference_ms
    return results


def print_table(results: list[Result]) -> None:
    print(f"{'op':16} {'model':6} {'case':44} {'kernel ms':>10} {'ref ms':>10} {'speedup':>8}  vs / target")
    for r in results:
        verdict = "" if r.passed is None else (" PASS" if r.passed else " FAIL")
        print(f"{r.op:16} {r.model:6} {r.case:44} {r.kernel_ms:10.3f} {r.reference_ms:10.3f} {r.speedup:7.2f}x"
              f"  {r.reference}{' ' + r.target if r.target else ''}{verdict}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="write the results to this file")
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--only", default=None, help="comma-separated ops")
    args = parser.parse_args(argv)
    results = run(args.repeat, set(args.only.split(",")) if args.only else None)
    print_table(results)
    print_panel_gflops(results)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump([asdict(r) | {"speedup": r.speedup} for r in results], f, indent=1)
    return 0 if all(r.passed is not False for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
