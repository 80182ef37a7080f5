"""One registry for the engine's hot ops: `get_kernels(backend, compute_dtype=...)` returns a
kernels.interface.KernelSet (rope, write_kv, paged_attention, expert_linear, rms_norm, swiglu, gelu, linear,
prepare_weight) whichever backend serves it.

Backends: "cpu" (the AOT kernels of kernels/cpu), "reference" (the MindSpore composites of kernels/reference.py),
"ascend-builtin" / "ascend-custom" (kernels/ascend.py: MindSpore's built-in Ascend kernels, the project's Ascend C
ops), "auto" (on a CPU: cpu if its library loads, else reference with a warning; on an Ascend device: per op what
the table's ascend_backends says). COGVLM2_KERNELS forces one.
Tuned parameters (threads, tiles) come from kernels.sku.load_params: this SKU's table, else the built-in defaults.

Projection weights keep their storage dtype (float32, bfloat16 or float16: prepare_weight takes the checkpoint's
array as it is). The compute dtype of a kernel set says how 16-bit weights are multiplied (activations and outputs
are float32 throughout):
- "float32": every weight widened to fp32, fp32 products (bf16 weights: bit-identical to float32 weights holding
  the same values);
- "bfloat16": bf16 weights in bf16 products (activations rounded to bf16 once per call, fp32 accumulation);
- "float16": fp16 weights widened to fp32 (this CPU has no fp16 arithmetic), as under "float32".
Float32 weights are computed in fp32 under any compute dtype; fp16 weights under "bfloat16", or bf16 weights under
"float16", are an error. COGVLM2_BF16_FALLBACK=1 makes the CPU kernels take the portable fallback of vdpbf16ps.
Under quantization="w8a8" the quantized projections' math is integer whatever the compute dtype (activations
quantized per token, kernels/quantization.py); COGVLM2_VNNI_FALLBACK=1 makes them take the fallback of vpdpbusd.
Both dot products take AMX tiles for blocks of 16 tokens where the CPU has them (kernels/cpu/gemm_amx.h);
COGVLM2_AMX=0 keeps them on the AVX-512 tiles.
"""
from __future__ import annotations

import os
import warnings
from functools import lru_cache
from typing import Any

import ml_dtypes
import numpy as np
from mindspore import Tensor
from mindspore import dtype as mstype

from kernels import composites, reference
from kernels.composites import pad_block_tables
from kernels.device import CPU, Device
from kernels.interface import KernelSet
from kernels.quantization import (Int8Rows, QuantizedWeight, check_quantization, column_offsets, dequantize,
                                 int8_rows)
from kernels.runtime import configured_device
from kernels.sku import (BACKENDS, GEMM_MINDSPORE, GEMM_ONEDNN, GEMM_OPENBLAS, GEMM_OWN, GEMM_PREPACKED, KernelParams,
                         check_result_params, load_params)

# expert_linear's addend (kernels/cpu/expert_linear.cc): none, the vision expert's bias, a residual for every row
ADDEND_NONE, ADDEND_BIAS, ADDEND_RESIDUAL = 0, 1, 2
ADDENDS = (ADDEND_NONE, ADDEND_BIAS, ADDEND_RESIDUAL)
THREADS_ONLY_OPS = ("rope", "rms_norm", "swiglu", "gelu")  # ops whose config is [threads]
DECODE_MAX_TOKENS = 64  # calls over at most this many tokens use the "decode" parameters, larger ones "prefill"
# The panel ops' widen_rows where no table sets it: on AVX512-BF16 (no AMX), widening was 1.5x faster than pairing
# at 1 token, 1.3x at 2 and slower from 4 (the fp32 FMAs then cost more than the pass that pairs the weights).
WIDEN_ROWS = 2
# The panel ops' parallel_min_work where no table sets it: calls of fewer tokens x weights run on one thread.
PARALLEL_MIN_WORK = 1 << 20
# The panel ops' prefetch_rows where no table sets it: every call's tiles prefetch the panel slice read next into L2.
PREFETCH_ROWS = 0
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
BF16_FALLBACK_ENV = "COGVLM2_BF16_FALLBACK"
VNNI_FALLBACK_ENV = "COGVLM2_VNNI_FALLBACK"
AMX_ENV = "COGVLM2_AMX"  # "0": the bf16 and int8 dot products never take AMX tiles (the table's "amx": 0 per op)

# The table op whose parameters a projection uses, by (weight dtype, compute dtype); a pair missing is a mismatch.
# The 16-bit ops fall back to the float32 GEMM's entry (kernels.sku.DEFAULT_PARAMS) where a table lacks them.
PANEL_OPS = {
    **{(mstype.float32, c): "expert_linear" for c in COMPUTE_DTYPES},
    (mstype.bfloat16, "float32"): "expert_linear_bf16", (mstype.bfloat16, "bfloat16"): "expert_linear_bf16_dot",
    (mstype.float16, "float32"): "expert_linear_f16", (mstype.float16, "float16"): "expert_linear_f16",
    # w8a16: the integers widened in registers, scaled per column as the sums are stored; under bfloat16 they are
    # bf16 (exact) in bf16 products
    (mstype.int8, "float32"): "expert_linear_i8", (mstype.int8, "float16"): "expert_linear_i8",
    (mstype.int8, "bfloat16"): "expert_linear_i8_bf16_dot",
    # w8a8: int8 weights and per-token int8 activations, integer products (vpdpbusd) under any compute dtype
    **{("w8a8", c): "expert_linear_i8_vnni" for c in COMPUTE_DTYPES},
}
INT8_DOT_OP = "expert_linear_i8_vnni"
WEIGHT_DTYPES = {np.dtype(np.float32): mstype.float32, np.dtype(ml_dtypes.bfloat16): mstype.bfloat16,
                 np.dtype(np.float16): mstype.float16}


def shape_class(num_tokens: int) -> str:
    return "decode" if num_tokens <= DECODE_MAX_TOKENS else "prefill"


def _np(x: Any) -> np.ndarray:
    return x.asnumpy() if isinstance(x, Tensor) else np.asarray(x)


def _i32(x: Any) -> Tensor:
    if isinstance(x, Tensor):
        return x if x.dtype == mstype.int32 else x.astype(mstype.int32)
    return Tensor.from_numpy(np.ascontiguousarray(np.asarray(x), np.int32))


class BaseKernels:
    """What the backends share: the compute dtype, the quantization, checkpoint-layout weights and MindSpore's
    MatMul for linear."""
    backend: str
    params: KernelParams
    compute_dtype: str
    quantization: str | None = None

    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int,
                       head_elements: int) -> tuple[int, ...]:
        return num_blocks * block_size, num_kv_heads, head_elements

    def place_kv_cache(self, cache):
        return cache

    def linear(self, x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
        if self._int8_dot(w):
            return reference.int8_dot_linear(x, w, bias)
        return reference.widened_linear(x, w, bias, self._bf16_dot(w))

    def prepare_weight(self, weight: np.ndarray, quantize: bool = True) -> Tensor | QuantizedWeight:
        if self.quantization is not None and quantize:
            return self._quantized(weight)
        return composites.to_tensor(self._stored(weight))

    def _quantized(self, weight: np.ndarray, layout=lambda q: q, offsets: bool = False) -> QuantizedWeight:
        """The int8 weight and its scales (and with `offsets`, its column_offsets), the integers in `layout` (this
        backend's; [out, in] by default)."""
        q, scales = int8_rows(weight)
        return QuantizedWeight(composites.to_tensor(layout(q)), composites.to_tensor(scales),
                               composites.to_tensor(column_offsets(q)) if offsets else None)

    def _composite_expert_linear(self, x, num_language, wl, wv, bv, residual) -> Tensor:
        if self._int8_dot(wl):
            y = reference.int8_dot_expert_linear(x, num_language, wl, wv, bv)
        else:
            y = reference.widened_expert_linear(x, num_language, wl, wv, bv, self._bf16_dot(wl))
        return y if residual is None else residual + y

    def _stored(self, weight: np.ndarray) -> np.ndarray:
        """weight in its storage dtype (other dtypes as float32; int8 rows as the float32 weight they stand for),
        checked against the compute dtype."""
        weight = dequantize(weight.values, weight.scales) if isinstance(weight, Int8Rows) else np.asarray(weight)
        if weight.dtype not in WEIGHT_DTYPES:
            weight = weight.astype(np.float32)
        self._panel_op(WEIGHT_DTYPES[weight.dtype])
        return weight

    def _panel_op(self, weight_dtype) -> str:
        """PANEL_OPS of this compute dtype, as comparisons (which also compile inside mindspore.jit)."""
        op = "expert_linear"
        if weight_dtype == mstype.int8:
            op = PANEL_OPS.get((self.quantization if self.quantization == "w8a8" else mstype.int8, self.compute_dtype))
        elif weight_dtype == mstype.bfloat16:
            op = PANEL_OPS.get((mstype.bfloat16, self.compute_dtype))
        elif weight_dtype == mstype.float16:
            op = PANEL_OPS.get((mstype.float16, self.compute_dtype))
        if op is None:
            raise ValueError(f"{weight_dtype} weights cannot be computed in {self.compute_dtype} (kernels.registry "
                             "explains the compute dtypes)")
        return op

    def _bf16_dot(self, w: Tensor) -> bool:
        return self._panel_op(w.dtype).endswith("bf16_dot")

    def _int8_dot(self, w: Tensor) -> bool:
        return self._panel_op(w.dtype) == INT8_DOT_OP


class ReferenceKernels(BaseKernels):
    """The composites. rope returns new tensors (the inputs are left as they were)."""
    backend = "reference"

    def __init__(self, params: KernelParams, compute_dtype: str = "float32", quantization: str | None = None):
        self.params = params
        self.compute_dtype = _checked_compute_dtype(compute_dtype)
        self.quantization = check_quantization(quantization)
        self._meta_key: tuple | None = None
        self._meta: reference.PagedAttentionMetadata | None = None

    def rope(self, q, k, positions, cos_table, sin_table):
        idx = _i32(positions)
        cos, sin = cos_table[idx], sin_table[idx]
        return composites.apply_rope(q, cos, sin), composites.apply_rope(k, cos, sin)

    def write_kv(self, cache, slot_mapping, values):
        reference.write_kv_cache(cache, _i32(slot_mapping), values)
        return None

    def paged_attention(self, q, k_new, v_new, key_cache, value_cache, slot_mapping, seq_index, token_position,
                        block_tables, context_lens, block_size, rope=None):
        bf16_math = reference.uses_bf16_attention(self.compute_dtype, reference.cache_dtype(key_cache, value_cache))
        if k_new is None:
            q, k_new, v_new = composites.split_qkv(q, key_cache.shape[1])
        if rope is not None:
            q, k_new = self.rope(q, k_new, *rope)
        meta = self._metadata(slot_mapping, seq_index, token_position, block_tables, context_lens, block_size,
                              q.shape[1], key_cache.shape[1])
        reference.write_kv_cache(key_cache, meta.slot_mapping, k_new)
        reference.write_kv_cache(value_cache, meta.slot_mapping, v_new)
        return reference.paged_attention(q, key_cache, value_cache, meta, bf16_math)

    def expert_linear(self, x, num_language, wl, wv, bv, residual=None):
        return self._composite_expert_linear(x, num_language, wl, wv, bv, residual)

    def rms_norm(self, x, weight, eps):
        return composites.rms_norm(x, weight, eps)

    def swiglu(self, gate_up):
        return composites.swiglu(gate_up)

    def gelu(self, x):
        return composites.gelu(x)

    def _metadata(self, slot_mapping, seq_index, token_position, block_tables, context_lens, block_size,
                  num_heads, num_kv_heads) -> reference.PagedAttentionMetadata:
        """Built once per step: every layer of a forward passes the same arrays (compared by content)."""
        arrays = [_np(a).astype(np.int64) for a in (slot_mapping, seq_index, token_position, context_lens)]
        tables = [list(t) for t in block_tables] if isinstance(block_tables, list) else _np(block_tables)
        key = tuple(a.tobytes() for a in arrays) + (np.asarray(pad_block_tables(tables)).tobytes(), block_size,
                                                    num_heads, num_kv_heads)
        if key != self._meta_key:
            slots, seqs, positions, lens = arrays
            self._meta = reference.build_paged_metadata(seqs, positions, [list(t) for t in tables],
                                                        [int(n) for n in lens], slots, block_size, num_heads,
                                                        num_kv_heads)
            self._meta_key = key
        return self._meta


class CpuKernels(BaseKernels):
    """The AOT kernels. rope rotates q and k in place when they are contiguous (else contiguous copies of them)
    and returns the rotated tensors: use what it returns."""
    backend = "cpu"

    def __init__(self, params: KernelParams, compute_dtype: str = "float32", quantization: str | None = None):
        from kernels.ops import CpuOps  # noqa: PLC0415  (loading the library may fail: see get_kernels)
        self.params = with_panel_ops(params)
        check_result_params(self.params)
        self.compute_dtype = _checked_compute_dtype(compute_dtype)
        self.quantization = check_quantization(quantization)
        self.bf16_fallback = os.environ.get(BF16_FALLBACK_ENV, "0") not in ("", "0")
        self.vnni_fallback = os.environ.get(VNNI_FALLBACK_ENV, "0") not in ("", "0")
        self.amx = os.environ.get(AMX_ENV, "1") not in ("", "0")
        self.ops = CpuOps()
        self._configs = {**self._precomputed_configs(), **self._decode_projection_configs()}
        self._dummy_float = Tensor(np.zeros(1, np.float32))
        self._dummy_index = Tensor(np.zeros(1, np.int32))
        self._eps: dict[float, Tensor] = {}  # rms_norm's epsilon as the [1] tensor the kernel reads, per value

    def _config(self, op: str, num_tokens: int, *values: int) -> Tensor:
        """The int32 config tensor of a call. Made ahead for every key but prefill projections' (whose
        num_language is unbounded), so that a call only looks it up; a miss builds it from Python ints, which also
        works in jit."""
        key = (op, shape_class(num_tokens)) + values
        config = self._configs.get(key)
        return config if config is not None else Tensor(self._config_row(*key), mstype.int32)

    def _config_row(self, op: str, cls: str, *values: int) -> list[int]:
        p = self.params.get(op, cls)
        if op in THREADS_ONLY_OPS:
            return [p["threads"]]
        if op == "paged_attention":
            block_size, apply_rope, bf16_math = values
            return [block_size, p["threads"], p["query_tile"], p["key_tile"], p["parallel_min_work"], apply_rope,
                    bf16_math, self._amx(p)]
        num_language, addend = values  # an expert_linear op of PANEL_OPS
        gemm = self._gemm_kind(p["gemm"]) if op == "expert_linear" else GEMM_OWN  # 16-bit weights: panels only
        portable = self.vnni_fallback if op == INT8_DOT_OP else self.bf16_fallback
        return [num_language, addend, p["threads"], gemm, p["k_block"], p["n_block"],
                int(op.endswith("bf16_dot")), int(portable), p["tile_rows"], self._amx(p), p["widen_rows"],
                p["parallel_min_work"], p["prefetch_rows"]]

    def _amx(self, p: dict[str, int]) -> int:
        """1 where an op's parameters and COGVLM2_AMX both let it take AMX tiles."""
        return int(self.amx and p["amx"] != 0)

    def _gemm_kind(self, gemm: int) -> int:
        if (gemm == GEMM_OPENBLAS and self.ops.has_openblas) or (gemm == GEMM_ONEDNN and self.ops.has_onednn):
            return gemm
        return GEMM_OWN  # also for GEMM_PREPACKED on a weight that could not be prepacked

    @property
    def prepacks_weights(self) -> bool:
        return any(self.params.get("expert_linear", cls)["gemm"] == GEMM_PREPACKED for cls in ("decode", "prefill"))

    def prepare_weight(self, weight: np.ndarray, quantize: bool = True) -> Tensor | QuantizedWeight:
        """Panels when the rows allow (16-bit and int8 weights always: only the panel GEMM reads them; float32
        where the table prepacks), else the [out, in] array; w8a8's int8 panels in k quads, with their offsets."""
        from kernels.ops import PACKED_PANEL, pack_k_quads, pack_weight  # noqa: PLC0415  (loaded with the library)
        if self.quantization is not None and quantize:
            whole = lambda q: q.shape[0] % PACKED_PANEL == 0  # noqa: E731
            if self.quantization == "w8a8":
                return self._quantized(weight, lambda q: pack_k_quads(q) if whole(q) else q, offsets=True)
            return self._quantized(weight, lambda q: pack_weight(q) if whole(q) else q)
        weight = self._stored(weight)
        if weight.shape[0] % PACKED_PANEL == 0 and (weight.dtype != np.float32 or self.prepacks_weights):
            return composites.to_tensor(pack_weight(weight))
        return composites.to_tensor(weight)

    def linear(self, x, w, bias=None):
        if w.ndim >= 3:  # every row through "the vision expert" when there is a bias: the kernel adds it
            return self.expert_linear(x, 0 if bias is not None else x.shape[0], w, w, bias)
        return super().linear(x, w, bias)  # MindSpore's MatMul: faster than our unpacked GEMM at the lm_head's shape

    def _decode_projection_configs(self) -> dict[tuple, Tensor]:
        keys = [(op, "decode", language, bias) for op in dict.fromkeys(PANEL_OPS.values())
                for language in range(DECODE_MAX_TOKENS + 1) for bias in ADDENDS]
        return {key: Tensor(self._config_row(*key), mstype.int32) for key in keys}

    def _precomputed_configs(self) -> dict[tuple, Tensor]:
        keys = [(op, cls) for op in THREADS_ONLY_OPS for cls in ("decode", "prefill")]
        keys += [("paged_attention", cls, 1 << b, r, m) for cls in ("decode", "prefill") for b in range(9) for r in (0, 1)
                 for m in (0, 1)]
        return {key: Tensor(self._config_row(*key), mstype.int32) for key in keys}

    def rope(self, q, k, positions, cos_table, sin_table):
        return self.ops.rope(q, k, _i32(positions), cos_table, sin_table, self._config("rope", q.shape[0]))

    def write_kv(self, cache, slot_mapping, values):
        reference.cache_dtype(cache)
        return self.ops.write_kv(cache, _i32(slot_mapping), values)

    def paged_attention(self, q, k_new, v_new, key_cache, value_cache, slot_mapping, seq_index, token_position,
                        block_tables, context_lens, block_size, rope=None):
        dtype = reference.cache_dtype(key_cache, value_cache)  # the kernel's status would not say which
        if isinstance(block_tables, list):
            block_tables = pad_block_tables(block_tables)
        config = self._config("paged_attention", q.shape[0], int(block_size), int(rope is not None),
                              int(reference.uses_bf16_attention(self.compute_dtype, dtype)))
        positions, cos, sin = (_i32(rope[0]), rope[1], rope[2]) if rope is not None else \
            (self._dummy_index, self._dummy_float, self._dummy_float)
        if k_new is None:  # fused QKV: the kernel reads k and v inside q's rows
            k_new = v_new = self._dummy_float
        return self.ops.paged_attention(q, k_new, v_new, key_cache, value_cache, _i32(slot_mapping),
                                        _i32(seq_index), _i32(token_position), _i32(block_tables),
                                        _i32(context_lens), positions, cos, sin, config)

    def expert_linear(self, x, num_language, wl, wv, bv, residual=None):
        if bv is not None and residual is not None:
            raise ValueError("expert_linear: a bias and a residual together are not supported (the kernel adds one)")
        op = self._panel_op(wl.dtype)
        if wl.ndim == 2 and (op != "expert_linear" or  # 16-bit or int8 [out, in] (rows not in whole panels)
                             self.params.get("expert_linear", shape_class(x.shape[0]))["gemm"] == GEMM_MINDSPORE):
            return self._composite_expert_linear(x, num_language, wl, wv, bv, residual)
        addend = ADDEND_RESIDUAL if residual is not None else ADDEND_BIAS if bv is not None else ADDEND_NONE
        config = self._config(op, x.shape[0], int(num_language), addend)
        value = residual if residual is not None else bv if bv is not None else self._dummy_float
        if op == INT8_DOT_OP:
            return self.ops.expert_linear_int8_dot(x, wl.values, wv.values, wl.scales, wv.scales, wl.offsets,
                                                   wv.offsets, value, config)
        if isinstance(wl, QuantizedWeight):
            return self.ops.expert_linear_int8(x, wl.values, wv.values, wl.scales, wv.scales, value, config)
        return self.ops.expert_linear(x, wl, wv, value, config)

    def rms_norm(self, x, weight, eps):
        if eps not in self._eps:
            self._eps[eps] = Tensor(np.array([eps], np.float32))
        return self.ops.rms_norm(x, weight, self._eps[eps], self._config("rms_norm", x.shape[0]))

    def swiglu(self, gate_up):
        return self.ops.swiglu(gate_up, self._config("swiglu", gate_up.shape[0]))

    def gelu(self, x):
        return self.ops.gelu(x, self._config("gelu", x.shape[0]))


def resolve_backend(backend: str = "auto") -> str:
    forced = os.environ.get("COGVLM2_KERNELS", "").strip().lower()
    backend = forced or backend
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}: expected one of {BACKENDS}")
    return backend


def with_panel_ops(params: KernelParams) -> KernelParams:
    """params with an entry per panel op of PANEL_OPS and class: the table's over the float32 GEMM's, with tile_rows
    (tokens per tile; 0: the kernel's default), amx (1: the bf16/int8 dot products take AMX tiles where the CPU
    has them, for 16 tokens or more), widen_rows (w8a16 under bf16 products: calls of up to this many tokens
    widen the int8 weights in vdpbf16ps's order instead of pairing them as bf16; the same bits),
    parallel_min_work (the fewest tokens x weights for which a call takes its threads; fewer run on one) and
    prefetch_rows (calls of at least this many tokens prefetch the panel slice read next into L2 as their tiles
    go; fewer leave the weights to the hardware prefetcher; the same bits)."""
    ops = dict(params.ops)
    for op in dict.fromkeys(PANEL_OPS.values()):
        ops[op] = {cls: {"tile_rows": 0, "amx": 1, "widen_rows": WIDEN_ROWS, "parallel_min_work": PARALLEL_MIN_WORK,
                         "prefetch_rows": PREFETCH_ROWS, **params.ops["expert_linear"][cls],
                         **params.ops.get(op, {}).get(cls, {})}
                   for cls in ("decode", "prefill")}
    return KernelParams(params.sku, params.source, ops, params.ascend_backends)


def _checked_compute_dtype(compute_dtype: str) -> str:
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"unknown compute dtype {compute_dtype!r}: expected one of {COMPUTE_DTYPES}")
    return compute_dtype


def _ascend_kernels(backend: str, params: KernelParams, compute_dtype: str, quantization: str | None,
                    device: Device) -> KernelSet:
    from kernels.ascend import AscendKernels  # noqa: PLC0415  (an NPU's kernel set: only there)
    from kernels.ascend_build import installed_package  # noqa: PLC0415
    choices = dict(params.ascend_backends)
    if backend != "auto":
        choices = dict.fromkeys(choices, backend[len("ascend-"):])
    if "custom" in choices.values() and installed_package() is None:
        missing = ("the project's Ascend C ops are not installed: run `python -m kernels.ascend_build "
                   "--install-path DIR` and add DIR/vendors/cogvlm2 to ASCEND_CUSTOM_OPP_PATH")
        if backend == "ascend-custom":
            raise RuntimeError(f"kernels='ascend-custom': {missing}")
        warnings.warn(f"cogvlm2 kernels: {params.source} chooses custom ops, but {missing}; using MindSpore's "
                      "built-in kernels", RuntimeWarning, stacklevel=4)
        choices = dict.fromkeys(choices, "builtin")
    return AscendKernels(params, compute_dtype, choices, device.soc_family, quantization)


def _check_device(backend: str, device: Device) -> None:
    on_ascend = device.target == "ascend"
    if backend.startswith("ascend-") and not on_ascend:
        raise ValueError(f"kernels={backend!r} runs on an Ascend NPU, but this process runs on {device.describe()} "
                         "(device='ascend')")
    if backend == "cpu" and on_ascend:
        raise ValueError("kernels='cpu' are the host CPU's kernels; on an Ascend device use 'auto', "
                         "'ascend-builtin', 'ascend-custom' or 'reference'")


@lru_cache(maxsize=None)
def _kernels(backend: str, config: str | None, compute_dtype: str, quantization: str | None,
             device: Device) -> KernelSet:
    _check_device(backend, device)
    params = load_params(path=config)
    if device.target == "ascend" and backend != "reference":
        return _ascend_kernels(backend, params, compute_dtype, quantization, device)
    if backend == "reference":
        return ReferenceKernels(params, compute_dtype, quantization)
    if backend == "cpu":
        return CpuKernels(params, compute_dtype, quantization)
    try:
        return CpuKernels(params, compute_dtype, quantization)
    except Exception as error:  # noqa: BLE001  (any load failure means: fall back)
        warnings.warn(f"cogvlm2 kernels: the CPU kernel library is unavailable ({error}); "
                      "using the reference composites", RuntimeWarning, stacklevel=3)
        return ReferenceKernels(params, compute_dtype, quantization)


def get_kernels(backend: str = "auto", config: str | None = None, compute_dtype: str = "float32",
                quantization: str | None = None, device: Device | None = None) -> KernelSet:
    """The KernelSet of `backend` (COGVLM2_KERNELS overrides it) on `device` (kernels.device; default: the device
    MindSpore was configured for, else the CPU), with parameters from `config` or this SKU's table, multiplying
    16-bit weights in `compute_dtype` (the module's docstring) and, with quantization "w8a16" or "w8a8", preparing
    every projection weight as int8 (kernels/quantization.py). One instance per argument set."""
    return _kernels(resolve_backend(backend), config, _checked_compute_dtype(compute_dtype),
                    check_quantization(quantization), device or configured_device() or CPU)
