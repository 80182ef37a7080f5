"""MindSpore custom ops over the CPU kernel library (kernels/cpu/*.cc, built by setup.py).

Each op is an `ops.Custom(func_type="aot")`, so it runs in PyNative and inside `mindspore.jit`. The in-place ops
(rope, write_kv, and the cache write inside paged_attention) write through their input pointers and return a small
token; inside `jit`, keep a data dependency on what they return (the wrappers return the updated tensors through
`ops.depend`), otherwise graph mode drops the op as unused.
"""
from __future__ import annotations

import ctypes
import glob
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

from kernels import pyboost

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

LIBRARY_GLOB = str(Path(__file__).parent / "cpu" / "_cogvlm2_kernels*.so")


class KernelLibraryError(RuntimeError):
    pass


def find_library() -> str:
    """COGVLM2_KERNEL_LIBRARY, else the library built next to this file."""
    if os.environ.get("COGVLM2_KERNEL_LIBRARY"):
        return os.environ["COGVLM2_KERNEL_LIBRARY"]
    paths = sorted(glob.glob(LIBRARY_GLOB))
    if not paths:
        raise KernelLibraryError(f"no kernel library matches {LIBRARY_GLOB}: build it with `pip install -e .` "
                                 "(needs a C++17 compiler)")
    return paths[-1]


def find_blas() -> str | None:
    """An OpenBLAS with an SGEMM: COGVLM2_BLAS, else the one inside the numpy (or scipy) wheel, else the system's.
    numpy is imported first, so the wheel's libgfortran it depends on is already loaded."""
    if os.environ.get("COGVLM2_BLAS"):
        return os.environ["COGVLM2_BLAS"]
    site = Path(np.__file__).parent.parent
    for pattern in ("numpy.libs/libopenblas*.so*", "scipy.libs/libscipy_openblas*.so*"):
        found = sorted(glob.glob(str(site / pattern)))
        if found:
            return found[0]
    for name in ("libopenblas.so.0", "libopenblas.so", "libcblas.so.3", "libblas.so.3"):
        try:
            ctypes.CDLL(name)
            return name
        except OSError:
            continue
    return None


def find_onednn() -> str | None:
    """The oneDNN that ships inside the MindSpore wheel (mindspore/lib/libdnnl.so.3): dnnl_sgemm, single-threaded."""
    found = sorted(glob.glob(str(Path(ms.__file__).parent / "lib" / "libdnnl.so*")))
    return found[0] if found else None


@dataclass(frozen=True)
class Library:
    path: str
    blas: str | None    # an OpenBLAS with an SGEMM, or None
    onednn: str | None  # oneDNN's dnnl_sgemm, or None; expert_linear falls back to the built-in GEMM


_library: Library | None = None


def load_library() -> Library:
    """Opens the kernel library once and hands it the GEMM libraries. MindSpore dlopens the same file later, which
    returns the same handle, so the GEMMs given here are the ones its kernels call."""
    global _library
    if _library is None:
        path = find_library()
        handle = ctypes.CDLL(path)
        blas, onednn = find_blas(), find_onednn()
        if blas is not None and handle.cogvlm2_load_blas(blas.encode()) != 0:
            blas = None
        if onednn is not None and handle.cogvlm2_load_onednn(onednn.encode()) != 0:
            onednn = None
        _library = Library(path, blas, onednn)
    return _library


def _custom(symbol: str, out_shape, out_dtype) -> ops.Custom:
    return ops.Custom(f"{load_library().path}:{symbol}", out_shape=out_shape, out_dtype=out_dtype, func_type="aot")


def int32_tensor(values) -> Tensor:
    return Tensor.from_numpy(np.ascontiguousarray(np.asarray(values), np.int32))


def _token_shape(*shapes):
    return (1,)


def _token_dtype(*dtypes):
    return ms.int32


PACKED_PANEL = 32  # kernels/cpu/gemm.h kPackedPanel


def pack_weight(w: np.ndarray) -> np.ndarray:
    """[out, in] -> the prepacked GEMM's column panels [out / 32, in, 32] (out must be a multiple of 32)."""
    out, inner = w.shape
    if out % PACKED_PANEL:
        raise ValueError(f"pack_weight: out features {out} is not a multiple of {PACKED_PANEL}")
    return np.ascontiguousarray(w.reshape(out // PACKED_PANEL, PACKED_PANEL, inner).transpose(0, 2, 1))


def unpack_weight(panels: np.ndarray) -> np.ndarray:
    """The inverse of pack_weight."""
    p, inner, width = panels.shape
    return np.ascontiguousarray(panels.transpose(0, 2, 1).reshape(p * width, inner))


def _paged_attention_shape(q, k_new, v_new, key_cache, *rest):
    """[N, H * d]; with fused QKV (q [N, H + 2 KV, d], k_new and v_new [1]) H = q's heads - 2 KV."""
    heads = q[1] - 2 * key_cache[1] if len(k_new) == 1 else q[1]
    return (q[0], heads * q[2])


def _expert_linear_shape(x, wl, *rest):
    return (x[0], wl[0] * wl[2] if len(wl) == 3 else wl[0])


class CpuOps:
    """The AOT ops, created once. Tuning parameters travel as a small int32 `config` tensor per call."""

    def __init__(self):
        self.library = load_library()
        self._rope = _custom("RopeInplace", _token_shape, _token_dtype)
        self._write_kv = _custom("WriteKVCache", _token_shape, _token_dtype)
        self._paged_attention = _custom("PagedAttention", _paged_attention_shape, lambda q, *rest: q)
        self._expert_linear = _custom("ExpertLinear", _expert_linear_shape, lambda x, *rest: x)
        # the pyboost twin for eager in-place calls (kernels/pyboost.py), or None: then the AOT ops serve them too
        self.eager = pyboost.load(self.library.path) if os.environ.get("COGVLM2_EAGER_OPS", "1") != "0" else None

    @property
    def has_openblas(self) -> bool:
        return self.library.blas is not None

    @property
    def has_onednn(self) -> bool:
        return self.library.onednn is not None

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

    def write_kv(self, cache: Tensor, slot_mapping: Tensor, values: Tensor) -> Tensor:
        return self._write_kv(cache, slot_mapping, values)

    def paged_attention(self, q: Tensor, k_new: Tensor, v_new: Tensor, key_cache: Tensor, value_cache: Tensor,
                        slot_mapping: Tensor, seq_index: Tensor, token_position: Tensor, block_tables: Tensor,
                        context_lens: Tensor, rope_positions: Tensor, cos_table: Tensor, sin_table: Tensor,
                        config: Tensor) -> Tensor:
        """config [block_size, threads, query_tile, key_tile, parallel_min_work, apply_rope] -> [N, H * d].
        With apply_rope, q and k_new are rotated by rope_positions inside the kernel (the inputs are left as
        they are; the cache gets the rotated K); without, the three rope inputs are ignored (any [1] tensors).
        Fused: q may be the QKV projection [N, H + 2 KV, d] with k_new and v_new any [1] tensors."""
        return self._paged_attention(q, k_new, v_new, key_cache, value_cache, slot_mapping, seq_index,
                                     token_position, block_tables, context_lens, rope_positions, cos_table,
                                     sin_table, config)

    def expert_linear(self, x: Tensor, wl: Tensor, wv: Tensor, bv: Tensor, config: Tensor) -> Tensor:
        """config [num_language, has_bias, threads, gemm, k_block, n_block] with gemm 0 (built-in), 1 (OpenBLAS,
        needs has_openblas) or 2 (oneDNN, needs has_onednn); bv is ignored (pass any [1] tensor) when has_bias
        is 0. wl and wv may instead both be prepacked (pack_weight): then the prepacked GEMM runs whatever gemm
        says, with k_block."""
        return self._expert_linear(x, wl, wv, bv, config)
