"""MindSpore custom ops over the CPU kernel library (kernels/cpu/*.cc, found and loaded by kernels/library.py).

Each op is an `ops.Custom(func_type="aot")`, so it runs in PyNative and inside `mindspore.jit`. The in-place ops
(rope, write_kv, and the cache write inside paged_attention) write through their input pointers and return a small
token; inside `jit`, keep a data dependency on what they return (the wrappers return the updated tensors through
`ops.depend`), otherwise graph mode drops the op as unused.
"""
from __future__ import annotations

import ctypes
import os

import ml_dtypes
import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

from kernels import pyboost
from kernels.library import load_library

from mindspore.ops.primitive import constexpr


def _no_op() -> int:
    return 0


@constexpr(check=False)
def _is_none(value) -> bool:
    return value is None


def _run_in_jit() -> bool:
    """True while mindspore.jit compiles the caller: jit hands a constexpr a function value as None (the check
    MindSpore uses internally)."""
    return _is_none(_no_op)


def _custom(symbol: str, out_shape, out_dtype) -> ops.Custom:
    return ops.Custom(f"{load_library().path}:{symbol}", out_shape=out_shape, out_dtype=out_dtype, func_type="aot")


def _token_shape(*shapes):
    return (1,)


def _token_dtype(*dtypes):
    return ms.int32


PACKED_PANEL = 32  # kernels/cpu/gemm.h kPackedPanel
BF16 = np.dtype(ml_dtypes.bfloat16)
PANEL_DTYPES = (np.dtype(np.float32), BF16, np.dtype(np.float16), np.dtype(np.int8))


def pack_weight(w: np.ndarray) -> np.ndarray:
    """[out, in] -> the panel GEMM's prepacked panels in w's dtype (out must be a multiple of 32; gemm.h has the
    layouts): float32, float16 and int8 k-major [out / 32, in, 32]; bfloat16 in k pairs [out / 32, ceil(in / 2),
    32, 2]."""
    out = w.shape[0]
    if out % PACKED_PANEL:
        raise ValueError(f"pack_weight: out features {out} is not a multiple of {PACKED_PANEL}")
    if w.dtype not in PANEL_DTYPES:
        raise ValueError(f"pack_weight: dtype {w.dtype} is none of {[str(d) for d in PANEL_DTYPES]}")
    return pack_k_pairs(w) if w.dtype == BF16 else pack_k_major(w)


def unpack_weight(panels: np.ndarray, in_features: int | None = None) -> np.ndarray:
    """The inverse of pack_weight and pack_k_quads; in_features drops the zero columns `in` was padded with (k pairs
    and quads)."""
    return unpack_k_groups(panels, in_features) if panels.ndim == 4 else unpack_k_major(panels)


def pack_k_major(w: np.ndarray) -> np.ndarray:
    """[out, in] -> [out / 32, in, 32]: panels[p, k, c] = w[32 p + c, k]."""
    out, inner = w.shape
    return np.ascontiguousarray(w.reshape(out // PACKED_PANEL, PACKED_PANEL, inner).transpose(0, 2, 1))


def unpack_k_major(panels: np.ndarray) -> np.ndarray:
    p, inner, width = panels.shape
    return np.ascontiguousarray(panels.transpose(0, 2, 1).reshape(p * width, inner))


def pack_k_pairs(w: np.ndarray) -> np.ndarray:
    """[out, in] -> [out / 32, ceil(in / 2), 32, 2]: bf16 panels for vdpbf16ps."""
    return pack_k_groups(w, 2)


def pack_k_quads(q: np.ndarray) -> np.ndarray:
    """int8 [out, in] (out a multiple of 32) -> [out / 32, ceil(in / 4), 32, 4]: w8a8's panels for vpdpbusd."""
    if q.dtype != np.int8 or q.shape[0] % PACKED_PANEL:
        raise ValueError(f"pack_k_quads: int8 weights with out features a multiple of {PACKED_PANEL}, got {q.dtype} "
                         f"{q.shape}")
    return pack_k_groups(q, 4)


def pack_k_groups(w: np.ndarray, group: int) -> np.ndarray:
    """[out, in] -> [out / 32, ceil(in / group), 32, group]: panels[p, j, c, i] = w[32 p + c, group j + i], zero
    past `in`."""
    out, inner = w.shape
    padded = np.zeros((out, -(-inner // group) * group), w.dtype)
    padded[:, :inner] = w
    return np.ascontiguousarray(padded.reshape(out // PACKED_PANEL, PACKED_PANEL, -1, group).transpose(0, 2, 1, 3))


def unpack_k_groups(panels: np.ndarray, in_features: int | None = None) -> np.ndarray:
    p, groups, width, group = panels.shape
    w = panels.transpose(0, 2, 1, 3).reshape(p * width, group * groups)
    return np.ascontiguousarray(w[:, :in_features] if in_features is not None else w)


def _paged_attention_shape(q, k_new, v_new, key_cache, *rest):
    """[N, H * d]; with fused QKV (q [N, H + 2 KV, d], k_new and v_new [1]) H = q's heads - 2 KV."""
    heads = q[1] - 2 * key_cache[1] if len(k_new) == 1 else q[1]
    return (q[0], heads * q[2])


def _expert_linear_shape(x, wl, *rest):
    return (x[0], wl[0] * wl[2] if len(wl) >= 3 else wl[0])


def _swiglu_shape(gate_up, *rest):
    return (gate_up[0], gate_up[1] // 2)


def _first_shape(x, *rest):
    return x


class CpuOps:
    """The AOT ops, created once. Tuning parameters travel as a small int32 `config` tensor per call."""

    def __init__(self):
        self.library = load_library()
        self._rope = _custom("RopeInplace", _token_shape, _token_dtype)
        self._write_kv = _custom("WriteKVCache", _token_shape, _token_dtype)
        self._paged_attention = _custom("PagedAttention", _paged_attention_shape, lambda q, *rest: q)
        self._expert_linear = _custom("ExpertLinear", _expert_linear_shape, lambda x, *rest: x)
        self._expert_linear_int8 = _custom("ExpertLinearInt8", _expert_linear_shape, lambda x, *rest: x)
        self._expert_linear_int8_dot = _custom("ExpertLinearInt8Dot", _expert_linear_shape, lambda x, *rest: x)
        self._rms_norm = _custom("RmsNorm", _first_shape, lambda x, *rest: x)
        self._swiglu = _custom("SwiGLU", _swiglu_shape, lambda x, *rest: x)
        self._gelu = _custom("Gelu", _first_shape, lambda x, *rest: x)
        # the pyboost twin for eager in-place calls (kernels/pyboost.py), or None: then the AOT ops serve them too
        self.eager = pyboost.load(self.library.path) if os.environ.get("COGVLM2_EAGER_OPS", "1") != "0" else None

    @property
    def has_openblas(self) -> bool:
        return self.library.blas is not None

    @property
    def has_onednn(self) -> bool:
        return self.library.onednn is not None

    @property
    def has_bf16_dot(self) -> bool:
        """Whether the bf16-dot panel GEMM runs vdpbf16ps here (else its fallback: the same results)."""
        return bool(ctypes.CDLL(self.library.path).cogvlm2_has_bf16_dot())

    @property
    def has_amx(self) -> bool:
        """Whether the bf16- and int8-dot panel GEMMs take AMX tiles for 16 tokens or more here (kernels/cpu/gemm_amx.h)."""
        return bool(ctypes.CDLL(self.library.path).cogvlm2_has_amx())

    @property
    def has_int8_dot(self) -> bool:
        """Whether the int8-dot panel GEMM (w8a8) runs vpdpbusd here (else its fallback: the same results)."""
        return bool(ctypes.CDLL(self.library.path).cogvlm2_has_int8_dot())

    def rope(self, q: Tensor, k: Tensor, positions: Tensor, cos_table: Tensor, sin_table: Tensor,
             config: Tensor) -> tuple[Tensor, Tensor]:
        """q [N, H, d] and k [N, KV, d] rotated in place; config [threads]. A strided view (a slice of the fused
        QKV output in PyNative) is first made contiguous, since MindSpore would hand the kernel a temporary copy
        and the rotation would be lost: always use the returned tensors."""
        if not _run_in_jit():  # PyNative runs the op now: no dependency to keep, and contiguous inputs need no copy
            q = q if q.is_contiguous() else q.contiguous()
            k = k if k.is_contiguous() else k.contiguous()
            if self.eager is not None:
                self.eager.run_inplace("RopeInplace", [q, k, positions, cos_table, sin_table, config])
            else:
                self._rope(q, k, positions, cos_table, sin_table, config)
            return q, k
        q, k = q.contiguous(), k.contiguous()
        done = self._rope(q, k, positions, cos_table, sin_table, config)
        return ops.depend(q, done), ops.depend(k, done)

    def _run(self, symbol: str, op: ops.Custom, out_shape: tuple[int, ...], *inputs: Tensor) -> Tensor:
        """A kernel with one float32 output: through the pyboost twin when called eagerly (~3 us of dispatch
        instead of ~90), else (inside jit, or without the twin) through the AOT op."""
        if not _run_in_jit():
            if self.eager is not None:
                return self.eager.run(symbol, list(inputs), list(out_shape))
        return op(*inputs)

    def rms_norm(self, x: Tensor, weight: Tensor, eps: Tensor, config: Tensor) -> Tensor:
        """x [N, d] fp32, weight [d], eps [1] fp32, config [threads] -> [N, d]."""
        return self._run("RmsNorm", self._rms_norm, tuple(x.shape), x, weight, eps, config)

    def swiglu(self, gate_up: Tensor, config: Tensor) -> Tensor:
        """gate_up [N, 2F] fp32 (gate first), config [threads] -> silu(gate) * up [N, F]."""
        return self._run("SwiGLU", self._swiglu, (gate_up.shape[0], gate_up.shape[1] // 2), gate_up, config)

    def gelu(self, x: Tensor, config: Tensor) -> Tensor:
        """x [N, F] fp32, config [threads] -> the exact GELU [N, F]."""
        return self._run("Gelu", self._gelu, tuple(x.shape), x, config)

    def write_kv(self, cache: Tensor, slot_mapping: Tensor, values: Tensor) -> Tensor:
        """values [N, KV, d] fp32 into cache [slots, KV, d] (float32, bfloat16 or float16: rounded to nearest even)
        at slot_mapping, in place."""
        return self._write_kv(cache, slot_mapping, values)

    def paged_attention(self, q: Tensor, k_new: Tensor, v_new: Tensor, key_cache: Tensor, value_cache: Tensor,
                        slot_mapping: Tensor, seq_index: Tensor, token_position: Tensor, block_tables: Tensor,
                        context_lens: Tensor, rope_positions: Tensor, cos_table: Tensor, sin_table: Tensor,
                        config: Tensor) -> Tensor:
        """config [block_size, threads, query_tile, key_tile, parallel_min_work, apply_rope] -> [N, H * d] fp32.
        The caches are both float32, both bfloat16 or both float16: k_new/v_new (fp32) are rounded to nearest even
        into them and read back widened to fp32; q and the output are fp32.
        With apply_rope, q and k_new are rotated by rope_positions inside the kernel (the inputs are left as
        they are; the cache gets the rotated K); without, the three rope inputs are ignored (any [1] tensors).
        Fused: q may be the QKV projection [N, H + 2 KV, d] with k_new and v_new any [1] tensors."""
        out_shape = _paged_attention_shape(q.shape, k_new.shape, v_new.shape, key_cache.shape)
        return self._run("PagedAttention", self._paged_attention, out_shape, q, k_new, v_new, key_cache, value_cache,
                         slot_mapping, seq_index, token_position, block_tables, context_lens, rope_positions,
                         cos_table, sin_table, config)

    def expert_linear(self, x: Tensor, wl: Tensor, wv: Tensor, addend: Tensor, config: Tensor) -> Tensor:
        """config [num_language, addend, threads, gemm, k_block, n_block, bf16_dot, portable, tile_rows, amx,
        widen_rows, parallel_min_work, prefetch_rows] (from bf16_dot on optional: 0; kernels.registry.with_panel_ops
        says what each does) with gemm 0 (built-in), 1 (OpenBLAS, needs has_openblas) or 2 (oneDNN, needs
        has_onednn); addend 0: none (pass any [1] tensor), 1: the vision expert's bias [out] (vision rows),
        2: a residual [N, out] added to every row. wl and wv may instead both be
        prepacked (pack_weight) in float32, bfloat16 or float16: then the panel GEMM runs whatever gemm says,
        with k_block and tile_rows, in fp32 math or, for bfloat16 panels with bf16_dot, in bf16 products
        (portable: the fallback of vdpbf16ps)."""
        out_shape = _expert_linear_shape(x.shape, wl.shape)
        return self._run("ExpertLinear", self._expert_linear, out_shape, x, wl, wv, addend, config)

    def expert_linear_int8(self, x: Tensor, wl: Tensor, wv: Tensor, sl: Tensor, sv: Tensor, addend: Tensor,
                           config: Tensor) -> Tensor:
        """expert_linear over int8 panels (pack_weight of int8 [out, in]) with their per-output-channel scales
        sl and sv [out] (fp32): each weight is q * scale, dequantized in registers; fp32 products."""
        out_shape = _expert_linear_shape(x.shape, wl.shape)
        return self._run("ExpertLinearInt8", self._expert_linear_int8, out_shape, x, wl, wv, sl, sv, addend, config)

    def expert_linear_int8_dot(self, x: Tensor, wl: Tensor, wv: Tensor, sl: Tensor, sv: Tensor, ol: Tensor,
                               ov: Tensor, addend: Tensor, config: Tensor) -> Tensor:
        """expert_linear in w8a8 over int8 panels in k quads (pack_k_quads) with their scales sl and sv [out] (fp32)
        and offsets ol and ov [out] (int32, kernels.quantization.column_offsets): x quantized per token inside the
        call, integer dot products (config's portable: the fallback of vpdpbusd)."""
        out_shape = _expert_linear_shape(x.shape, wl.shape)
        return self._run("ExpertLinearInt8Dot", self._expert_linear_int8_dot, out_shape, x, wl, wv, sl, sv, ol, ov,
                         addend, config)
