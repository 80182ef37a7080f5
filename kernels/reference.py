"""Reference composites (plain MindSpore ops) of the engine's hot ops: the oracle for every kernel test.

- write_kv_cache: K/V of this step's tokens into the paged cache by slot_mapping, in place.
- paged_attention: attention of a flat varlen batch (decodes + prefill chunks) over the paged cache, GQA, causal.
- widened_linear, widened_expert_linear: the projections over weights of any storage dtype, the panel GEMMs' oracle.
- int8_dot_linear, int8_dot_expert_linear: w8a8's projections (per-token int8 activations, integer dot products).
The rotary and expert-routed projection composites are the leaf math of kernels/composites.py.

A KV cache holds float32, bfloat16 or float16 (CACHE_DTYPES; the cache tensor's dtype says which): fp32 values are
rounded to nearest even on write (MindSpore's Cast) and widened to fp32 on read, so the attention math is fp32. An
int8 cache is [num_slots, kv_heads, head_dim + 4]: each token's row of each KV head quantized on write as
kernels.quantization.quantize_int8 quantizes a weight row (symmetric, round to nearest, scale max |x| / 127), its
fp32 scale in the row's last 4 bytes; read as q * scale in fp32.
MindSpore 2.10's CPU Gather and ScatterUpdate have no bfloat16 kernel: a bfloat16 cache is read by gathering its
uint16 view, and written through that view by slice assignment (the one in-place write that reaches the cache's
memory through a view), one slice per run of consecutive slots.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from mindspore import Parameter, Tensor, ops

from kernels.quantization import QuantizedWeight, quantize_int8
from mindspore import dtype as mstype

from kernels.composites import expert_linear, linear, softmax_attention

_NEG_INF = np.float32(-np.inf)

CACHE_DTYPES = (mstype.float32, mstype.bfloat16, mstype.float16, mstype.int8)
INT8_KV_SCALE_BYTES = 4


def cache_head_elements(head_dim: int, dtype: str) -> int:
    """Elements of one token's cache row of one KV head, for a cache dtype by name."""
    return head_dim + INT8_KV_SCALE_BYTES if dtype == "int8" else head_dim


def uses_bf16_attention(compute_dtype: str, cache_dtype) -> bool:
    """Attention rounds P to bf16 before P @ V (bf16 products) for compute dtype bfloat16 over a bfloat16 cache;
    every other combination multiplies in fp32."""
    return compute_dtype == "bfloat16" and cache_dtype == mstype.bfloat16


def cache_dtype(key_cache: Tensor, value_cache: Tensor | None = None):
    """The dtype of a call's caches: one of CACHE_DTYPES, the same for both (ValueError otherwise)."""
    dtype = key_cache.dtype
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"KV cache dtype {dtype} is not one of {CACHE_DTYPES}")
    if value_cache is not None and value_cache.dtype != dtype:
        raise ValueError(f"the key cache is {dtype} but the value cache is {value_cache.dtype}: they must match")
    return dtype


def write_kv_cache(cache: Parameter, slot_mapping: Tensor, values: Tensor) -> None:
    """cache [num_slots, kv_heads, head_dim] (a CACHE_DTYPES dtype); slot_mapping [N] int32; values [N, kv_heads,
    head_dim], rounded to the cache's dtype."""
    dtype = cache_dtype(cache)
    if dtype == mstype.int8:
        return ops.scatter_update(cache, slot_mapping, _quantized_rows(values))
    if values.dtype != dtype:
        values = values.astype(dtype)
    if dtype == mstype.bfloat16:
        _write_bf16_rows(cache, slot_mapping, values)
    else:
        ops.scatter_update(cache, slot_mapping, values)


def _write_bf16_rows(cache: Parameter, slot_mapping: Tensor, values: Tensor) -> None:
    slots = slot_mapping.asnumpy() if isinstance(slot_mapping, Tensor) else np.asarray(slot_mapping)
    order = np.argsort(slots, kind="stable")  # a repeated slot: the last token in forward order wins
    sorted_slots = slots[order]
    rows = ops.gather(values.view(mstype.uint16), _int_tensor(order), 0)
    breaks = (np.flatnonzero(np.diff(sorted_slots) != 1) + 1).tolist()
    target = cache.view(mstype.uint16)
    for begin, end in zip([0] + breaks, breaks + [len(slots)]):
        first = int(sorted_slots[begin])
        target[first:first + end - begin] = rows[begin:end]


def _quantized_rows(values: Tensor) -> Tensor:
    """[N, KV, d] fp32 -> the int8 cache rows [N, KV, d + 4]: values, then the scale's bytes."""
    n, kv, d = values.shape
    q, scales = quantize_int8(values.asnumpy().reshape(n * kv, d))
    rows = np.concatenate([q, scales.reshape(-1, 1).view(np.int8)], axis=1)
    return Tensor.from_numpy(rows.reshape(n, kv, d + INT8_KV_SCALE_BYTES))


def _dequantized_rows(rows: Tensor) -> Tensor:
    rows = rows.asnumpy()
    d = rows.shape[-1] - INT8_KV_SCALE_BYTES
    scales = np.ascontiguousarray(rows[..., d:]).view(np.float32)
    return Tensor.from_numpy(rows[..., :d].astype(np.float32) * scales)


def _gather_rows(cache: Tensor, slots: Tensor) -> Tensor:
    """The cache's rows at slots, widened (or dequantized) to fp32."""
    if cache.dtype == mstype.int8:
        return _dequantized_rows(ops.gather(cache, slots, 0))
    if cache.dtype == mstype.float32:
        return ops.gather(cache, slots, 0)
    if cache.dtype == mstype.bfloat16:
        return ops.gather(cache.view(mstype.uint16), slots, 0).view(mstype.bfloat16).astype(mstype.float32)
    return ops.gather(cache, slots, 0).astype(mstype.float32)


def widen(w: Tensor | QuantizedWeight) -> Tensor:
    """A weight of any storage dtype as float32 (exact for bfloat16 and float16); an int8 one [out, in] as
    q * scale per output row."""
    if isinstance(w, QuantizedWeight):
        return ops.cast(w.values, mstype.float32) * w.scales.reshape(-1, 1)
    return w if w.dtype == mstype.float32 else ops.cast(w, mstype.float32)


def round_to_bf16(x: Tensor) -> Tensor:
    """x rounded to bfloat16 (to nearest even), as float32."""
    return ops.cast(ops.cast(x, mstype.bfloat16), mstype.float32)


def widened_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, bf16_dot: bool = False) -> Tensor:
    """x [N, in] @ widen(weight [out, in])^T (+ bias) in fp32; bf16_dot rounds x to bf16 first (the activations of
    the bf16-dot GEMM). The panel GEMMs equal this up to the order of their fp32 sums."""
    return linear(round_to_bf16(x) if bf16_dot else x, widen(weight), bias)


def widened_expert_linear(x: Tensor, num_language: int, language_w: Tensor, vision_w: Tensor,
                          vision_b: Tensor | None = None, bf16_dot: bool = False) -> Tensor:
    """composites.expert_linear with widened_linear's math."""
    return expert_linear(round_to_bf16(x) if bf16_dot else x, num_language, widen(language_w), widen(vision_w),
                         vision_b)


def int8_dot_linear(x: Tensor, weight: QuantizedWeight, bias: Tensor | None = None) -> Tensor:
    """w8a8's x [N, in] @ weight [out, in]^T (+ bias), the CPU kernels' math (kernels/cpu/gemm.h kInt8Dot): each
    row of x quantized to int8 like the weights (quantize_int8), the integer dot products exact (taken in float64:
    every partial sum is an integer far below 2^53), rounded to fp32 once, times the row's scale, then the column's."""
    xq, x_scales = quantize_int8(x.asnumpy())
    sums = (xq.astype(np.float64) @ weight.values.asnumpy().astype(np.float64).T).astype(np.float32)
    y = Tensor.from_numpy(sums * x_scales[:, None] * weight.scales.asnumpy()[None, :])
    return y if bias is None else y + bias


def int8_dot_expert_linear(x: Tensor, num_language: int, language_w: QuantizedWeight, vision_w: QuantizedWeight,
                           vision_b: Tensor | None = None) -> Tensor:
    """composites.expert_linear with int8_dot_linear's math."""
    return expert_linear(x, num_language, language_w, vision_w, vision_b, project=int8_dot_linear)


@dataclass
class DecodeGroup:
    """Single-token queries, batched: each reads its own context through its slot list."""
    rows: Tensor            # [B] positions of the queries in the forward's token order
    context_slots: Tensor   # [B * max_len] int32, padded with slot 0
    mask: Tensor            # [B * kv_heads, 1, max_len] additive
    batch: int
    max_len: int


@dataclass
class PrefillGroup:
    """One sequence's chunk of queries, causal by sequence index, over its context slots [0, end)."""
    rows: Tensor            # [n] positions of the chunk's queries in the forward's token order
    context_slots: Tensor   # [end] int32
    mask: Tensor            # [1, group * n, end] additive (query head rows grouped by KV head)
    num_queries: int


@dataclass
class PagedAttentionMetadata:
    slot_mapping: Tensor          # [N] slot of each token, in forward order
    decode: DecodeGroup | None
    prefills: list[PrefillGroup]
    restore_order: Tensor         # gather index putting [decode rows, prefill rows...] back in forward order


def build_paged_metadata(seq_index: np.ndarray, token_position: np.ndarray, seq_block_tables: list[list[int]],
                         seq_context_lens: list[int], slot_mapping: np.ndarray, block_size: int, num_heads: int,
                         num_kv_heads: int) -> PagedAttentionMetadata:
    """All arrays in forward order. seq_index: which sequence of the batch each token belongs to;
    token_position: its index in that sequence; seq_context_lens: tokens visible to the sequence's last query."""
    group = num_heads // num_kv_heads
    rows_by_seq = [np.nonzero(seq_index == s)[0] for s in range(len(seq_context_lens))]
    decode_seqs = [s for s, rows in enumerate(rows_by_seq) if len(rows) == 1]
    prefill_seqs = [s for s, rows in enumerate(rows_by_seq) if len(rows) > 1]
    slots_of = lambda s: _context_slots(seq_block_tables[s], seq_context_lens[s], block_size)  # noqa: E731
    decode = None
    if decode_seqs:
        max_len = max(seq_context_lens[s] for s in decode_seqs)
        slots = np.zeros((len(decode_seqs), max_len), np.int32)
        mask = np.full((len(decode_seqs), max_len), _NEG_INF, np.float32)
        for b, s in enumerate(decode_seqs):
            slots[b, :seq_context_lens[s]] = slots_of(s)
            mask[b, :seq_context_lens[s]] = 0
        mask = np.repeat(mask[:, None, None, :], num_kv_heads, axis=1).reshape(-1, 1, max_len)
        decode = DecodeGroup(_int_tensor(np.array([rows_by_seq[s][0] for s in decode_seqs])),
                             _int_tensor(slots.reshape(-1)), Tensor.from_numpy(np.ascontiguousarray(mask)),
                             len(decode_seqs), max_len)
    prefills = []
    for s in prefill_seqs:
        rows = rows_by_seq[s]
        end = seq_context_lens[s]
        visible = np.arange(end)[None, :] <= token_position[rows][:, None]
        mask = np.tile(np.where(visible, np.float32(0), _NEG_INF), (group, 1))[None]
        prefills.append(PrefillGroup(_int_tensor(rows), _int_tensor(slots_of(s)),
                                     Tensor.from_numpy(np.ascontiguousarray(mask, np.float32)), len(rows)))
    decode_rows = np.array([rows_by_seq[s][0] for s in decode_seqs], np.int64)
    grouped_rows = np.concatenate([decode_rows] + [rows_by_seq[s] for s in prefill_seqs]).astype(np.int64)
    restore = np.empty_like(grouped_rows)
    restore[grouped_rows] = np.arange(grouped_rows.shape[0])
    return PagedAttentionMetadata(_int_tensor(slot_mapping), decode, prefills, _int_tensor(restore))


def paged_attention(q: Tensor, key_cache: Tensor, value_cache: Tensor, meta: PagedAttentionMetadata,
                    bf16_math: bool = False) -> Tensor:
    """q [N, H, d] in forward order; caches [num_slots, KV, d] already holding this step's K/V -> [N, H * d] fp32.
    bf16_math: P rounded to bf16 before P @ V (composites.softmax_attention)."""
    n, num_heads, head_dim = q.shape
    num_kv = key_cache.shape[1]
    group = num_heads // num_kv
    scale = head_dim ** -0.5
    outputs = []
    if meta.decode is not None:
        d = meta.decode
        qd = ops.gather(q, d.rows, 0).reshape(d.batch * num_kv, group, head_dim)
        k = _gather_batched(key_cache, d.context_slots, d.batch, d.max_len)
        v = _gather_batched(value_cache, d.context_slots, d.batch, d.max_len)
        outputs.append(softmax_attention(qd, k, v, d.mask, scale, bf16_math).reshape(d.batch, num_heads * head_dim))
    for p in meta.prefills:
        qp = ops.gather(q, p.rows, 0).transpose(1, 0, 2).reshape(num_kv, group * p.num_queries, head_dim)
        k = _gather_rows(key_cache, p.context_slots).transpose(1, 0, 2)
        v = _gather_rows(value_cache, p.context_slots).transpose(1, 0, 2)
        out = softmax_attention(qp, k, v, p.mask, scale, bf16_math)
        outputs.append(out.reshape(num_heads, p.num_queries, head_dim).transpose(1, 0, 2)
                       .reshape(p.num_queries, num_heads * head_dim))
    merged = outputs[0] if len(outputs) == 1 else ops.concat(outputs, 0)
    return ops.gather(merged, meta.restore_order, 0)


def _gather_batched(cache: Tensor, slots: Tensor, batch: int, max_len: int) -> Tensor:
    gathered = _gather_rows(cache, slots)
    num_kv, head_dim = gathered.shape[1], gathered.shape[2]
    gathered = gathered.reshape(batch, max_len, num_kv, head_dim)
    return gathered.transpose(0, 2, 1, 3).reshape(batch * num_kv, max_len, head_dim)


def _context_slots(block_table: list[int], context_len: int, block_size: int) -> np.ndarray:
    index = np.arange(context_len)
    return (np.asarray(block_table, np.int64)[index // block_size] * block_size + index % block_size).astype(np.int32)


def _int_tensor(array) -> Tensor:
    return Tensor.from_numpy(np.ascontiguousarray(np.asarray(array), np.int32))


@dataclass
class PagedBatch:
    """A synthetic flat batch over a paged cache (tests and benchmarks): every array in forward order."""
    slot_mapping: np.ndarray     # [N] int32
    seq_index: np.ndarray        # [N] int32
    token_position: np.ndarray   # [N] int32
    block_tables: list[list[int]]
    context_lens: np.ndarray     # [B] int32
    block_size: int
    num_slots: int


def make_paged_batch(context_lens: list[int], new_tokens: list[int], block_size: int, rng: np.random.Generator,
                     shuffle: bool = False, spare_blocks: int = 2) -> PagedBatch:
    """Sequence b holds context_lens[b] tokens of which the last new_tokens[b] are this step's (1 = a decode, more
    = a prefill chunk, which starts mid-block when its start is not a multiple of block_size). Blocks are scattered
    at random over the cache; shuffle puts the tokens in a random order (as routed order does)."""
    blocks = [-(-n // block_size) for n in context_lens]
    total = sum(blocks) + spare_blocks
    scattered = rng.permutation(total)
    starts = np.cumsum([0] + blocks)
    tables = [[int(b) for b in scattered[starts[s]:starts[s + 1]]] for s in range(len(blocks))]
    seq = np.concatenate([np.full(new, s) for s, new in enumerate(new_tokens)]).astype(np.int32)
    pos = np.concatenate([np.arange(n - new, n) for n, new in zip(context_lens, new_tokens)]).astype(np.int32)
    slots = np.array([tables[s][p // block_size] * block_size + p % block_size for s, p in zip(seq, pos)], np.int32)
    if shuffle:
        order = rng.permutation(len(seq))
        seq, pos, slots = seq[order], pos[order], slots[order]
    return PagedBatch(slots, seq, pos, tables, np.asarray(context_lens, np.int32), block_size, total * block_size)
