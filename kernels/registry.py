"""One registry for the engine's hot ops: `get_kernels(backend)` returns a kernels.interface.KernelSet (rope,
write_kv, paged_attention, expert_linear, linear, prepare_weight) whichever backend serves it.

Backends: "cpu" (the AOT kernels of kernels/cpu), "reference" (the MindSpore composites of kernels/reference.py),
"auto" (cpu if its library loads, else reference with a warning). COGVLM2_KERNELS=cpu|reference forces one.
Tuned parameters (threads, tiles) come from kernels.sku.load_params: this SKU's table, else the built-in defaults.
"""
from __future__ import annotations

import os
import warnings
from functools import lru_cache
from typing import Any

import numpy as np
from mindspore import Tensor
from mindspore import dtype as mstype

from kernels import composites, reference
from kernels.interface import KernelSet
from kernels.sku import (BACKENDS, GEMM_MINDSPORE, GEMM_ONEDNN, GEMM_OPENBLAS, GEMM_OWN, GEMM_PREPACKED, KernelParams,
                         load_params)

DECODE_MAX_TOKENS = 64  # calls over at most this many tokens use the "decode" parameters, larger ones "prefill"


def shape_class(num_tokens: int) -> str:
    return "decode" if num_tokens <= DECODE_MAX_TOKENS else "prefill"


def _np(x: Any) -> np.ndarray:
    return x.asnumpy() if isinstance(x, Tensor) else np.asarray(x)


def _i32(x: Any) -> Tensor:
    if isinstance(x, Tensor):
        return x if x.dtype == mstype.int32 else x.astype(mstype.int32)
    return Tensor.from_numpy(np.ascontiguousarray(np.asarray(x), np.int32))


def pad_block_tables(block_tables: list[list[int]]) -> np.ndarray:
    """Per-sequence block lists -> [B, max_blocks] int32 (padded with 0; padding is never read)."""
    width = max((len(t) for t in block_tables), default=0) or 1
    table = np.zeros((len(block_tables), width), np.int32)
    for b, blocks in enumerate(block_tables):
        table[b, :len(blocks)] = blocks
    return table


class BaseKernels:
    """What the backends share: checkpoint-layout weights and MindSpore's MatMul for linear."""
    backend: str
    params: KernelParams

    def linear(self, x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
        return composites.linear(x, w, bias)

    def prepare_weight(self, weight: np.ndarray) -> Tensor:
        return composites.to_tensor(weight)


class ReferenceKernels(BaseKernels):
    """The composites. rope returns new tensors (the inputs are left as they were)."""
    backend = "reference"

    def __init__(self, params: KernelParams):
        self.params = params
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
        reference.cache_dtype(key_cache, value_cache)
        if k_new is None:
            q, k_new, v_new = composites.split_qkv(q, key_cache.shape[1])
        if rope is not None:
            q, k_new = self.rope(q, k_new, *rope)
        meta = self._metadata(slot_mapping, seq_index, token_position, block_tables, context_lens, block_size,
                              q.shape[1], key_cache.shape[1])
        reference.write_kv_cache(key_cache, meta.slot_mapping, k_new)
        reference.write_kv_cache(value_cache, meta.slot_mapping, v_new)
        return reference.paged_attention(q, key_cache, value_cache, meta)

    def expert_linear(self, x, num_language, wl, wv, bv):
        return composites.expert_linear(x, num_language, wl, wv, bv)

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

    def __init__(self, params: KernelParams):
        from kernels.ops import CpuOps  # noqa: PLC0415  (loading the library may fail: see get_kernels)
        self.params = params
        self.ops = CpuOps()
        self._configs = self._precomputed_configs()
        self._dummy_float = Tensor(np.zeros(1, np.float32))
        self._dummy_index = Tensor(np.zeros(1, np.int32))

    def _config(self, op: str, num_tokens: int, *values: int) -> Tensor:
        """The int32 config tensor of a call. Made ahead for every key but expert_linear's (whose num_language
        varies), so that a call only looks it up; a miss builds it from Python ints, which also works in jit."""
        key = (op, shape_class(num_tokens)) + values
        config = self._configs.get(key)
        return config if config is not None else Tensor(self._config_row(*key), mstype.int32)

    def _config_row(self, op: str, cls: str, *values: int) -> list[int]:
        p = self.params.get(op, cls)
        if op == "rope":
            return [p["threads"]]
        if op == "paged_attention":
            block_size, apply_rope = values
            return [block_size, p["threads"], p["query_tile"], p["key_tile"], p["parallel_min_work"], apply_rope]
        num_language, has_bias = values
        return [num_language, has_bias, p["threads"], self._gemm_kind(p["gemm"]), p["k_block"], p["n_block"]]

    def _gemm_kind(self, gemm: int) -> int:
        if (gemm == GEMM_OPENBLAS and self.ops.has_openblas) or (gemm == GEMM_ONEDNN and self.ops.has_onednn):
            return gemm
        return GEMM_OWN  # also for GEMM_PREPACKED on a weight that could not be prepacked

    @property
    def prepacks_weights(self) -> bool:
        return any(self.params.get("expert_linear", cls)["gemm"] == GEMM_PREPACKED for cls in ("decode", "prefill"))

    def prepare_weight(self, weight: np.ndarray) -> Tensor:
        from kernels.ops import PACKED_PANEL, pack_weight  # noqa: PLC0415  (loaded with the library)
        if self.prepacks_weights and weight.shape[0] % PACKED_PANEL == 0:
            return composites.to_tensor(pack_weight(np.asarray(weight, np.float32)))
        return composites.to_tensor(weight)

    def linear(self, x, w, bias=None):
        if w.ndim == 3:  # every row through "the vision expert" when there is a bias: the kernel adds it
            return self.expert_linear(x, 0 if bias is not None else x.shape[0], w, w, bias)
        return composites.linear(x, w, bias)  # MindSpore's MatMul: faster than our unpacked GEMM at the lm_head's shape

    def _precomputed_configs(self) -> dict[tuple, Tensor]:
        keys = [("rope", cls) for cls in ("decode", "prefill")]
        keys += [("paged_attention", cls, 1 << b, r) for cls in ("decode", "prefill") for b in range(9) for r in (0, 1)]
        return {key: Tensor(self._config_row(*key), mstype.int32) for key in keys}

    def rope(self, q, k, positions, cos_table, sin_table):
        return self.ops.rope(q, k, _i32(positions), cos_table, sin_table, self._config("rope", q.shape[0]))

    def write_kv(self, cache, slot_mapping, values):
        reference.cache_dtype(cache)
        return self.ops.write_kv(cache, _i32(slot_mapping), values)

    def paged_attention(self, q, k_new, v_new, key_cache, value_cache, slot_mapping, seq_index, token_position,
                        block_tables, context_lens, block_size, rope=None):
        reference.cache_dtype(key_cache, value_cache)  # the kernel's status would not say which
        if isinstance(block_tables, list):
            block_tables = pad_block_tables(block_tables)
        config = self._config("paged_attention", q.shape[0], int(block_size), int(rope is not None))
        positions, cos, sin = (_i32(rope[0]), rope[1], rope[2]) if rope is not None else \
            (self._dummy_index, self._dummy_float, self._dummy_float)
        if k_new is None:  # fused QKV: the kernel reads k and v inside q's rows
            k_new = v_new = self._dummy_float
        return self.ops.paged_attention(q, k_new, v_new, key_cache, value_cache, _i32(slot_mapping),
                                        _i32(seq_index), _i32(token_position), _i32(block_tables),
                                        _i32(context_lens), positions, cos, sin, config)

    def expert_linear(self, x, num_language, wl, wv, bv):
        if wl.ndim == 2 and self.params.get("expert_linear", shape_class(x.shape[0]))["gemm"] == GEMM_MINDSPORE:
            return composites.expert_linear(x, num_language, wl, wv, bv)
        config = self._config("expert_linear", x.shape[0], int(num_language), int(bv is not None))
        return self.ops.expert_linear(x, wl, wv, self._dummy_float if bv is None else bv, config)


def resolve_backend(backend: str = "auto") -> str:
    forced = os.environ.get("COGVLM2_KERNELS", "").strip().lower()
    backend = forced or backend
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}: expected one of {BACKENDS}")
    return backend


@lru_cache(maxsize=None)
def _kernels(backend: str, config: str | None) -> KernelSet:
    params = load_params(path=config)
    if backend == "reference":
        return ReferenceKernels(params)
    if backend == "cpu":
        return CpuKernels(params)
    try:
        return CpuKernels(params)
    except Exception as error:  # noqa: BLE001  (any load failure means: fall back)
        warnings.warn(f"cogvlm2 kernels: the CPU kernel library is unavailable ({error}); "
                      "using the reference composites", RuntimeWarning, stacklevel=3)
        return ReferenceKernels(params)


def get_kernels(backend: str = "auto", config: str | None = None) -> KernelSet:
    """The KernelSet of `backend` (COGVLM2_KERNELS overrides it), with parameters from `config` or this SKU's table.
    One instance per (backend, config)."""
    return _kernels(resolve_backend(backend), config)
