"""A stand-in for the NPU under kernels/ascend.py: every primitive the Ascend kernel sets build is recorded (its
constructor arguments, and per call each input's shape and dtype or value), checked against MindSpore 2.10's own
Python definition of that primitive (the installed package: mindspore.ops.auto_generate's classes, and for the
custom ops the inputs and attributes their op_host files declare), and computed by a NumPy model of what
docs/ascend.md says the kernel does, so the host logic around them can be compared with kernels/reference.py."""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np
from mindspore import Tensor
from mindspore.ops import auto_generate

from kernels.ascend import AscendPrimitives

OP_HOST = Path(__file__).resolve().parent.parent / "kernels" / "ascend" / "op_host"
CUSTOM_SOURCES = {"RotaryCogvlm2": "rotary_cogvlm2.cpp", "PagedAttentionCogvlm2": "paged_attention_cogvlm2.cpp"}


@dataclass
class Call:
    primitive: str                # e.g. "PagedAttention", "Custom:RotaryCogvlm2"
    init: dict                    # constructor arguments by name (defaults filled in)
    inputs: dict                  # call arguments by name: ("tensor", shape, dtype) or the value


@dataclass
class Recorder:
    calls: list[Call] = field(default_factory=list)

    def named(self, primitive: str) -> list[Call]:
        return [c for c in self.calls if c.primitive == primitive]


def describe(value):
    if isinstance(value, Tensor):
        return ("tensor", tuple(value.shape), str(value.dtype))
    return value


def custom_declaration(func: str) -> tuple[list[str], list[str]]:
    """(input names, attribute names) that the op_host file declares, in order."""
    text = (OP_HOST / CUSTOM_SOURCES[func]).read_text(encoding="utf-8")
    return re.findall(r'def\.Input\("(\w+)"\)', text), re.findall(r'Attr\("(\w+)"\)', text)


def _f32(x) -> np.ndarray:
    return x.asnumpy().astype(np.float32) if isinstance(x, Tensor) else np.asarray(x, np.float32)


def _tensor(array: np.ndarray, like: Tensor) -> Tensor:
    dtype = np.dtype(ml_dtypes.bfloat16) if str(like.dtype) == "BFloat16" else like.asnumpy().dtype
    return Tensor.from_numpy(np.ascontiguousarray(array.astype(dtype)))


def _write(cache, rows: np.ndarray, slots: np.ndarray) -> None:
    """The cache Parameter with `rows` at `slots` of its flat [slots, ...] view (slot < 0 skipped)."""
    data = _f32(cache)
    keep = slots >= 0
    flat = data.reshape(-1, int(np.prod(rows.shape[1:])))
    flat[slots[keep]] = rows[keep].reshape(int(keep.sum()), -1)
    cache.set_data(_tensor(flat.reshape(data.shape), cache))


def _cache_rows(cache, kv_heads: int, head_dim: int) -> np.ndarray:
    """Any cache layout's logical rows: [num_slots, KV, D] (ND 4-D, ND-host view of NZ, flat)."""
    return _f32(cache).reshape(-1, kv_heads, head_dim)


def _attend(q: np.ndarray, keys: np.ndarray, values: np.ndarray, visible: int, scale: float) -> np.ndarray:
    """One query row [H, D] over keys[:visible] [*, KV, D] (GQA: head h reads KV head h // group)."""
    group = q.shape[0] // keys.shape[1]
    k = np.repeat(keys[:visible], group, axis=1)
    v = np.repeat(values[:visible], group, axis=1)
    scores = np.einsum("hd,khd->hk", q, k) * scale
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hk,khd->hd", p, v)


def _seq_keys(cache_rows: np.ndarray, table: np.ndarray, length: int, block_size: int) -> np.ndarray:
    slots = np.array([table[i // block_size] * block_size + i % block_size for i in range(length)], np.int64)
    return cache_rows[slots]


def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """NeoX rotate-half over each head: x [T, heads, D], cos/sin [T, D]."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos[:, None] + rotated * sin[:, None]


class StandInPrimitive:
    def __init__(self, name: str, recorder: Recorder, init: dict, model):
        self.name, self.recorder, self.init, self.model = name, recorder, init, model

    def add_prim_attr(self, key, value):
        self.init.setdefault("attrs", {})[key] = value
        return self

    def __call__(self, *args):
        inputs = self._bind(args)
        self.recorder.calls.append(Call(self.name, dict(self.init), {k: describe(v) for k, v in inputs.items()}))
        return self.model(self.init, inputs)

    def _bind(self, args) -> dict:
        if self.name.startswith("Custom:"):
            names, attrs = custom_declaration(self.name.split(":", 1)[1])
            assert len(args) == len(names) + len(attrs), (self.name, len(args), names, attrs)
            return dict(zip(names + attrs, args))
        signature = inspect.signature(getattr(auto_generate, self.name).__call__)
        bound = signature.bind(None, *args)  # raises if the call does not fit MindSpore's definition
        bound.apply_defaults()
        return {k: v for k, v in bound.arguments.items() if k != "self"}


class StandInPrimitives(AscendPrimitives):
    """AscendPrimitives that record and model instead of reaching an NPU."""

    def __init__(self):
        self.recorder = Recorder()

    def make(self, name: str, *args, **kwargs):
        if name == "Custom":
            func, out_shape, out_dtype = args
            inspect.signature(__import__("mindspore").ops.Custom.__init__).bind(
                None, func, out_shape=out_shape, out_dtype=out_dtype, func_type="aot")
            prim = StandInPrimitive(f"Custom:{func}", self.recorder, {"func_type": "aot"}, CUSTOM_MODELS[func])
            if kwargs.get("writes_inputs"):
                prim.add_prim_attr("side_effect_mem", True)
            return prim
        bound = inspect.signature(getattr(auto_generate, name).__init__).bind(None, *args, **kwargs)
        bound.apply_defaults()
        init = {k: v for k, v in bound.arguments.items() if k != "self"}
        return StandInPrimitive(name, self.recorder, init, MODELS[name])


# ---- NumPy models of the kernels (as docs/ascend.md describes them)
def reshape_and_cache(init, x):
    _write(x["key_cache"], _f32(x["key"]), x["slot_mapping"].asnumpy())
    if x["value"] is not None:
        _write(x["value_cache"], _f32(x["value"]), x["slot_mapping"].asnumpy())
    return x["key"]


def paged_attention(init, x):
    q = _f32(x["query"])
    heads, kv_heads, head_dim = init["head_num"], init["kv_head_num"], q.shape[-1]
    keys, values = (_cache_rows(x[c], kv_heads, head_dim) for c in ("key_cache", "value_cache"))
    tables, lens = x["block_tables"].asnumpy(), x["context_lens"].asnumpy()
    q_lens = x["q_seq_lens"].asnumpy() if x["q_seq_lens"] is not None else np.ones(lens.shape[0], np.int32)
    block_size = x["key_cache"].shape[1]  # [num_blocks, block_size, ...] in ND and in NZ's host shape
    out, row = np.zeros_like(q), 0
    for s, (q_len, length) in enumerate(zip(q_lens, lens)):
        k, v = _seq_keys(keys, tables[s], length, block_size), _seq_keys(values, tables[s], length, block_size)
        for i in range(q_len):
            out[row] = _attend(q[row], k, v, length - q_len + i + 1, init["scale_value"])
            row += 1
    assert heads == q.shape[1] and row == q.shape[0]
    return _tensor(out, x["query"])


def flash_attention_score(init, x):
    q, k, v = (_f32(x[n]) for n in ("query", "key", "value"))
    ends = list(x["actual_seq_qlen"])
    assert list(x["actual_seq_kvlen"]) == ends and init["input_layout"] == "TND"
    out, start = np.zeros_like(q), 0
    for end in ends:
        for i in range(start, end):
            out[i] = _attend(q[i], k[start:end], v[start:end], i - start + 1, init["scale_value"])
        start = end
    zeros = Tensor(np.zeros(1, np.float32))
    return zeros, zeros, zeros, _tensor(out, x["query"])


def apply_rotary_pos_emb(init, x):
    q, k, cos, sin = (_f32(x[n]) for n in ("query", "key", "cos", "sin"))
    dim = cos.shape[-1]
    rq = _rotate(q.reshape(q.shape[0], -1, dim), cos, sin).reshape(q.shape)
    rk = _rotate(k.reshape(k.shape[0], -1, dim), cos, sin).reshape(k.shape)
    return _tensor(rq, x["query"]), _tensor(rk, x["key"])


def matmul(init, x):
    a, b = _f32(x["input"]), _f32(x["mat2"])
    return _tensor(a @ (b.T if init["transpose_b"] else b), x["input"])


def format_cast(init, x):
    return x["input"]  # MindSpore shows an NZ tensor in its ND host shape


def custom_rotary(init, x):
    positions = x["positions"].asnumpy()
    cos, sin = _f32(x["cos_table"])[positions], _f32(x["sin_table"])[positions]
    return _tensor(_rotate(_f32(x["query"]), cos, sin), x["query"]), _tensor(_rotate(_f32(x["key"]), cos, sin),
                                                                           x["key"])


def custom_paged_attention(init, x):
    slots = x["slot_mapping"].asnumpy()
    _write(x["key_cache"], _f32(x["key"]), slots)
    _write(x["value_cache"], _f32(x["value"]), slots)
    q, block_size = _f32(x["query"]), x["block_size"]
    kv_heads = x["key"].shape[1]
    keys, values = (_cache_rows(x[c], kv_heads, q.shape[-1]) for c in ("key_cache", "value_cache"))
    starts, lens, tables = x["query_start_loc"].asnumpy(), x["seq_lens"].asnumpy(), x["block_tables"].asnumpy()
    out = np.zeros_like(q)
    for s, length in enumerate(lens):
        k, v = _seq_keys(keys, tables[s], length, block_size), _seq_keys(values, tables[s], length, block_size)
        q_len = starts[s + 1] - starts[s]
        for i in range(q_len):
            out[starts[s] + i] = _attend(q[starts[s] + i], k, v, length - q_len + i + 1, x["scale"])
    return _tensor(out, x["query"])


MODELS = {"ReshapeAndCache": reshape_and_cache, "PagedAttention": paged_attention,
          "FlashAttentionScore": flash_attention_score, "ApplyRotaryPosEmb": apply_rotary_pos_emb,
          "MatMul": matmul, "FormatCast": format_cast}
CUSTOM_MODELS = {"RotaryCogvlm2": custom_rotary, "PagedAttentionCogvlm2": custom_paged_attention}
