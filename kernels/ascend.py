"""The kernel set of an Ascend NPU: MindSpore 2.10's built-in kernels ("builtin") or the project's Ascend C ops
("custom", kernels/ascend/ once kernels.ascend_build installed them), chosen per op (rope, paged_attention) by the
SKU's table (`ascend_backends`) or forced by kernels="ascend-builtin" / "ascend-custom". docs/ascend.md maps them.

- rope, builtin: ApplyRotaryPosEmb(cos_format=2) on q [T, H*D] and k [T, KV*D] with the cos/sin rows gathered per
  token by position id ([T, D]); custom: RotaryCogvlm2 on the whole tables.
- KV write + paged attention, builtin: ReshapeAndCache writes this step's K/V, then FlashAttentionScore (TND,
  right-down causal; not on 310P, which lacks it) when no sequence has cached context, else PagedAttention over
  the block tables, with q_seq_lens and the TRAPEZOIDAL mask when a sequence brings more than one token; custom:
  PagedAttentionCogvlm2 (writes and attends in one op).
- The dense ops (projections, norms, SwiGLU) are MindSpore ops: GEMMs in the compute dtype (bf16 on 910B, fp16 on
  310P; weights cast to it at load), norms and softmax-side math in fp32 as on CPU.
The KernelSet contract holds: activations enter and leave every op in fp32 and tokens arrive in routed order
(language tokens first); attention reorders them by sequence for the kernels, which need each sequence contiguous.

Caches: [num_blocks, block_size, KV, D] (ND) for the built-in kernels on 910B; on 310P their NZ form
(kernels/nz.py); the custom op's flat [num_slots, KV, D]. `kv_cache_shape` says which.

Everything that touches the NPU goes through `AscendPrimitives` (one `make(name, ...)`), so the tests run this
module's host logic on the CPU with a stand-in that records each primitive and call.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import ml_dtypes
import numpy as np
from mindspore import Parameter, Tensor, ops
from mindspore import dtype as mstype

from kernels import composites
from kernels.nz import FORMAT_NZ, nz_cache_shape
from kernels.sku import ASCEND_CHOICE_OPS, ASCEND_CHOICES, KernelParams

ASCEND_DTYPES = {"bfloat16": mstype.bfloat16, "float16": mstype.float16}
NUMPY_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}
NEOX_COS_FORMAT = 2              # ApplyRotaryPosEmb: rotate-half tables (vLLM-MindSpore's layout)
FA_MASK_SIZE = 2048              # FlashAttentionScore's compressed causal mask (sparse modes 2-4)
FA_RIGHT_DOWN_CAUSAL = 3
INT32_MAX = 2147483647
CUSTOM_ROPE, CUSTOM_PAGED_ATTENTION = "RotaryCogvlm2", "PagedAttentionCogvlm2"


class AscendPrimitives:
    """Builds the NPU's primitives: `make("ReshapeAndCache")` is MindSpore's generated primitive of that name
    (mindspore.ops.auto_generate, where 2.10 defines all of them: FlashAttentionScore and FormatCast are not
    re-exported by mindspore.ops.operations); `make("Custom", name, ...)` an Ascend C op through
    ops.Custom(func_type="aot")."""

    def make(self, name: str, *args, **kwargs):
        if name == "Custom":
            return self._custom(*args, **kwargs)
        from mindspore.ops import auto_generate  # noqa: PLC0415
        return getattr(auto_generate, name)(*args, **kwargs)

    @staticmethod
    def _custom(func: str, out_shape, out_dtype, writes_inputs: bool = False):
        op = ops.Custom(func, out_shape=out_shape, out_dtype=out_dtype, func_type="aot")
        if writes_inputs:  # graph mode must keep the in-place cache write
            op.add_prim_attr("side_effect_mem", True)
        return op


@dataclass(frozen=True)
class SequenceLayout:
    """A step's tokens regrouped by sequence: `order` gathers routed rows into sequence order, `restore` back."""
    order: np.ndarray       # [T] routed row of each sequence-ordered token
    restore: np.ndarray     # [T] sequence-ordered row of each routed token
    q_lens: np.ndarray      # [S] this step's tokens per sequence
    context_lens: np.ndarray  # [S] tokens each sequence's last query sees

    @property
    def is_identity(self) -> bool:
        return bool(np.array_equal(self.order, np.arange(self.order.shape[0])))

    @property
    def has_cached_context(self) -> bool:
        return bool(np.any(self.context_lens > self.q_lens))

    @property
    def query_start_loc(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.q_lens)]).astype(np.int32)


def sequence_layout(seq_index: np.ndarray, token_position: np.ndarray, context_lens: np.ndarray) -> SequenceLayout:
    """Each sequence's tokens must be the last q_len positions of its context, consecutive (the engine's chunks
    are): the kernels' causal rule, query i sees keys [0, context - q_len + i], is then the reference's."""
    seq_index, token_position = np.asarray(seq_index, np.int64), np.asarray(token_position, np.int64)
    context_lens = np.asarray(context_lens, np.int64)
    order = np.lexsort((token_position, seq_index))
    q_lens = np.bincount(seq_index, minlength=context_lens.shape[0])
    ends = np.cumsum(q_lens)
    for s, (q_len, end) in enumerate(zip(q_lens, ends)):
        positions = token_position[order[end - q_len:end]]
        expected = np.arange(context_lens[s] - q_len, context_lens[s])
        if q_len == 0 or not np.array_equal(positions, expected):
            raise ValueError(f"paged_attention on Ascend: sequence {s}'s tokens {positions.tolist()} are not the "
                             f"last {q_len} positions of its context of {context_lens[s]}")
    restore = np.empty_like(order)
    restore[order] = np.arange(order.shape[0])
    return SequenceLayout(order, restore, q_lens.astype(np.int32), context_lens.astype(np.int32))


def check_ascend_precision(compute_dtype: str, quantization: str | None, soc_family: str) -> None:
    if compute_dtype not in ASCEND_DTYPES:
        raise ValueError(f"dtype {compute_dtype!r} on Ascend: the Ascend kernels compute in "
                         f"{tuple(ASCEND_DTYPES)} (dtype='auto' picks the SoC's)")
    if compute_dtype == "bfloat16" and soc_family == "310p":
        raise ValueError("dtype 'bfloat16' on Ascend 310P: the 310P has no bf16; use float16 (dtype='auto')")
    if quantization is not None:
        raise ValueError(f"quantization {quantization!r} is not implemented for the Ascend kernel sets")


def _np(x) -> np.ndarray:
    return x.asnumpy() if isinstance(x, Tensor) else np.asarray(x)


def _i32(x) -> Tensor:
    return Tensor.from_numpy(np.ascontiguousarray(_np(x), np.int32))


class AscendKernels:
    """The Ascend kernel set (kernels.interface.KernelSet). `choices` maps rope and paged_attention to "builtin" or
    "custom"; `soc_family` ("910b", "310p") decides the built-in cache layout."""

    def __init__(self, params: KernelParams, compute_dtype: str, choices: dict[str, str], soc_family: str,
                 quantization: str | None = None, primitives: AscendPrimitives | None = None):
        check_ascend_precision(compute_dtype, quantization, soc_family)
        for op in ASCEND_CHOICE_OPS:
            if choices.get(op) not in ASCEND_CHOICES:
                raise ValueError(f"ascend_backends.{op} must be one of {ASCEND_CHOICES}, got {choices.get(op)!r}")
        self.params = params
        self.compute_dtype = compute_dtype
        self.quantization = None
        self.choices = dict(choices)
        self.soc_family = soc_family
        self.prims = primitives or AscendPrimitives()
        self.dtype = ASCEND_DTYPES[compute_dtype]
        self._made: dict[tuple, object] = {}
        self._tables: dict[int, tuple[Tensor, Tensor]] = {}  # fp32 rope table's id -> (it, it in the compute dtype)
        self._fa_mask: Tensor | None = None

    @property
    def backend(self) -> str:
        kinds = set(self.choices.values())
        return f"ascend-{kinds.pop()}" if len(kinds) == 1 else "ascend-" + "+".join(
            f"{op}:{self.choices[op]}" for op in ASCEND_CHOICE_OPS)

    @property
    def nz_cache(self) -> bool:
        """310P's built-in attention reads the cache in FRACTAL_NZ."""
        return self.soc_family == "310p" and self.choices["paged_attention"] == "builtin"

    # ---- primitives, built once per argument set
    def _prim(self, name: str, *args, **kwargs):
        key = (name, args, tuple(sorted(kwargs.items())))
        if key not in self._made:
            self._made[key] = self.prims.make(name, *args, **kwargs)
        return self._made[key]

    def _custom(self, func: str, out_shape, out_dtype, writes_inputs: bool = False):
        key = ("Custom", func)
        if key not in self._made:
            self._made[key] = self.prims.make("Custom", func, out_shape, out_dtype, writes_inputs=writes_inputs)
        return self._made[key]

    # ---- the KV cache
    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int,
                       head_elements: int) -> tuple[int, ...]:
        if self.choices["paged_attention"] == "custom":
            return num_blocks * block_size, num_kv_heads, head_elements
        if self.nz_cache:
            return nz_cache_shape(num_blocks, block_size, num_kv_heads, head_elements)
        return num_blocks, block_size, num_kv_heads, head_elements

    def place_kv_cache(self, cache: Parameter) -> Parameter:
        """The cache as the kernels read it: on 310P's built-ins, cast to NZ on the device once."""
        if not self.nz_cache:
            return cache
        return Parameter(self._prim("FormatCast")(cache, FORMAT_NZ), name=cache.name, requires_grad=False)

    def _kv_heads(self, key_cache: Tensor, head_dim: int) -> int:
        return key_cache.shape[-1] // head_dim if self.nz_cache else key_cache.shape[-2]

    # ---- weights and dense ops
    def prepare_weight(self, weight: np.ndarray, quantize: bool = True) -> Tensor:
        """The [out, in] weight in the compute dtype (the loader casts the checkpoint's: cogvlm2/precision.py; any
        other dtype is rounded to nearest even here), once at load."""
        weight, target = np.asarray(weight), NUMPY_DTYPES[self.compute_dtype]
        if weight.dtype != target:
            weight = weight.astype(np.float32).astype(target)
        return composites.to_tensor(weight)

    def _matmul(self, x: Tensor, w: Tensor) -> Tensor:
        return self._prim("MatMul", transpose_b=True)(x.astype(self.dtype), w).astype(mstype.float32)

    def linear(self, x, w, bias=None):
        y = self._matmul(x, w)
        return y if bias is None else y + bias

    def expert_linear(self, x, num_language, wl, wv, bv, residual=None):
        n = x.shape[0]
        parts = []
        if num_language > 0:
            parts.append(self._matmul(x[:num_language], wl))
        if num_language < n:
            vision = self._matmul(x[num_language:], wv)
            parts.append(vision if bv is None else vision + bv)
        y = parts[0] if len(parts) == 1 else ops.concat(parts, 0)
        return y if residual is None else residual + y

    def rms_norm(self, x, weight, eps):
        return composites.rms_norm(x, weight, eps)

    def swiglu(self, gate_up):
        return composites.swiglu(gate_up)

    def gelu(self, x):
        return composites.gelu(x)

    # ---- rope
    def _table(self, table: Tensor) -> Tensor:
        """The whole table in the compute dtype (the custom op indexes it), cast once per table (the entry holds the
        table, so its id cannot be reused by another)."""
        entry = self._tables.get(id(table))
        if entry is None or entry[0] is not table:
            entry = self._tables[id(table)] = (table, table.astype(self.dtype))
        return entry[1]

    def rope(self, q, k, positions, cos_table, sin_table):
        t, heads, dim = q.shape
        kv = k.shape[1]
        positions = _i32(positions)
        q16, k16 = q.astype(self.dtype), k.astype(self.dtype)
        if self.choices["rope"] == "custom":
            op = self._custom(CUSTOM_ROPE, lambda qs, ks, *_: (qs, ks), lambda qd, kd, *_: (qd, kd))
            q_out, k_out = op(q16, k16, positions, self._table(cos_table), self._table(sin_table))
        else:  # each token's rows, gathered in fp32 and then cast (T rows, not the table)
            cos, sin = (ops.gather(table, positions, 0).astype(self.dtype) for table in (cos_table, sin_table))
            op = self._prim("ApplyRotaryPosEmb", NEOX_COS_FORMAT)
            q_out, k_out = op(q16.reshape(t, heads * dim), k16.reshape(t, kv * dim), cos, sin, positions)
        return (q_out.reshape(t, heads, dim).astype(mstype.float32),
                k_out.reshape(t, kv, dim).astype(mstype.float32))

    # ---- the KV write and attention
    def write_kv(self, cache, slot_mapping, values):
        """values [N, KV, D] into the cache at slot_mapping."""
        values = values.astype(cache.dtype)
        if self.choices["paged_attention"] == "custom":  # flat [num_slots, KV, D]; the custom op has no lone write
            ops.scatter_update(cache, _i32(slot_mapping), values)
            return None
        self._prim("ReshapeAndCache")(values, None, cache, None, _i32(slot_mapping))
        return None

    def paged_attention(self, q, k_new, v_new, key_cache, value_cache, slot_mapping, seq_index, token_position,
                        block_tables, context_lens, block_size, rope=None):
        head_dim = q.shape[-1]
        kv_heads = self._kv_heads(key_cache, head_dim)
        if k_new is None:
            q, k_new, v_new = composites.split_qkv(q, kv_heads)
        if rope is not None:
            q, k_new = self.rope(q, k_new, *rope)
        layout = sequence_layout(_np(seq_index), _np(token_position), _np(context_lens))
        regroup = (lambda x: x) if layout.is_identity else \
            (lambda x: ops.gather(x, Tensor.from_numpy(layout.order.astype(np.int32)), 0))  # noqa: E731
        q16, k16, v16 = (regroup(x).astype(key_cache.dtype) for x in (q, k_new, v_new))
        slots = _i32(_np(slot_mapping)[layout.order])
        tables = _i32(composites.pad_block_tables(block_tables) if isinstance(block_tables, list) else block_tables)
        if self.choices["paged_attention"] == "custom":
            out = self._custom_attention(q16, k16, v16, key_cache, value_cache, slots, tables, layout, block_size)
        else:
            self._prim("ReshapeAndCache")(k16, v16, key_cache, value_cache, slots)
            out = self._builtin_attention(q16, k16, v16, key_cache, value_cache, tables, layout)
        out = out.reshape(out.shape[0], -1).astype(mstype.float32)
        return out if layout.is_identity else ops.gather(out, Tensor.from_numpy(layout.restore.astype(np.int32)), 0)

    def _builtin_attention(self, q, k, v, key_cache, value_cache, tables, layout: SequenceLayout) -> Tensor:
        heads, head_dim = q.shape[1], q.shape[2]
        scale = 1.0 / math.sqrt(head_dim)
        if not layout.has_cached_context and self.soc_family != "310p":  # whole prompts: this step's K/V only
            ends = tuple(int(e) for e in np.cumsum(layout.q_lens))
            op = self._prim("FlashAttentionScore", head_num=heads, scale_value=scale, pre_tokens=INT32_MAX,
                            next_tokens=0, input_layout="TND", sparse_mode=FA_RIGHT_DOWN_CAUSAL)
            return op(q, k, v, None, None, None, self._causal_mask(), None, ends, ends)[3]
        kv_heads = k.shape[1]
        lens = _i32(layout.context_lens)
        if int(layout.q_lens.max()) == 1:  # decodes only
            return self._prim("PagedAttention", heads, scale, kv_heads)(q, key_cache, value_cache, tables, lens)
        op = self._prim("PagedAttention", heads, scale, kv_heads, mask_mode="TRAPEZOIDAL")
        return op(q, key_cache, value_cache, tables, lens, None, None, None, _i32(layout.q_lens))

    def _causal_mask(self) -> Tensor:
        if self._fa_mask is None:  # 1 = masked: keys after the query (FlashAttentionScore's convention)
            self._fa_mask = Tensor.from_numpy(np.triu(np.ones((FA_MASK_SIZE, FA_MASK_SIZE), np.uint8), 1))
        return self._fa_mask

    def _custom_attention(self, q, k, v, key_cache, value_cache, slots, tables, layout: SequenceLayout,
                          block_size: int) -> Tensor:
        op = self._custom(CUSTOM_PAGED_ATTENTION, lambda qs, *_: qs, lambda qd, *_: qd, writes_inputs=True)
        # block_size and scale are the op's attributes, passed after the inputs as MindSpore does for aclnn ops
        return op(q, k, v, key_cache, value_cache, slots, tables, _i32(layout.query_start_loc),
                  _i32(layout.context_lens), int(block_size), 1.0 / math.sqrt(q.shape[-1]))

