"""Compiled (mindspore.jit) segments of a decoder layer for language-expert-only token sets.

Decode steps and text prefills (every token on the language expert) run each layer's two dense segments as graphs
compiled once per token-count bucket; the weights are graph inputs, so one compiled graph serves every layer.
Attention (with RoPE fused into it) runs between the two segments, outside the graph, over the real (unpadded)
tokens. The GEMMs go through the engine's kernel set (a custom GEMM op works inside jit), and the row-parallel
reductions of tensor parallelism (an AllReduce, which also works inside jit) are in the graph. The first graph
returns the fused QKV as its one output: a graph with several outputs costs ~3-7 ms more per call on this CPU
(measured: MindSpore 2.10 waits on its outputs in steps of ~4 ms), which would be most of a decode step's layer.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
from mindspore import Tensor, jit, ops

from cogvlm2.layers import rms_norm, swiglu

if TYPE_CHECKING:
    from kernels.interface import KernelSet


class LayerGraphs:
    def __init__(self, kernels: KernelSet, reduce: Callable[[Tensor], Tensor]):
        gemm = lambda x, w: kernels.expert_linear(x, x.shape[0], w, w, None)  # noqa: E731  (language rows only)

        def pre_attention(x: Tensor, norm_w: Tensor, qkv_w: Tensor, eps: float, qkv_heads: int,
                          head_dim: int) -> Tensor:
            return gemm(rms_norm(x, norm_w, eps), qkv_w).reshape(x.shape[0], qkv_heads, head_dim)

        def post_attention(x: Tensor, attn: Tensor, dense_w: Tensor, norm_w: Tensor, gate_up_w: Tensor,
                           down_w: Tensor, eps: float) -> Tensor:
            x = x + reduce(gemm(attn, dense_w))
            return x + reduce(gemm(swiglu(gemm(rms_norm(x, norm_w, eps), gate_up_w)), down_w))

        self.pre_attention = jit(pre_attention)
        self.post_attention = jit(post_attention)


def token_buckets(max_tokens: int) -> list[int]:
    """Powers of two up to (and including) the first one >= max_tokens."""
    buckets, size = [], 1
    while True:
        buckets.append(size)
        if size >= max_tokens:
            return buckets
        size *= 2


def bucket_for(num_tokens: int, buckets: list[int]) -> int | None:
    return next((b for b in buckets if b >= num_tokens), None)


def pad_rows(x: Tensor, rows: int) -> Tensor:
    extra = rows - x.shape[0]
    if extra == 0:
        return x
    return ops.concat((x, ops.zeros((extra,) + tuple(x.shape[1:]), x.dtype)), 0)


def zeros(*shape: int) -> Tensor:
    return Tensor(np.zeros(shape, np.float32))
