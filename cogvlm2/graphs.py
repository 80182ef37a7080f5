"""Compiled (mindspore.jit) segments of a decoder layer for language-expert-only token sets.

Decode steps and text prefills (every token on the language expert) run each layer's two dense segments as graphs
compiled once per token-count bucket; the weights are graph inputs, so one compiled graph serves every layer.
Attention runs between the two segments, outside the graph, over the real (unpadded) tokens. The GEMMs go
through the engine's kernel set (a custom GEMM op works inside jit); RoPE is in the first graph unless the
attention kernel fuses it, in which case the first graph returns the fused QKV as its one output: a graph with
several outputs costs ~3-7 ms more per call on this CPU (measured: MindSpore 2.10 waits on its outputs in
steps of ~4 ms), which would be most of a decode step's layer.
"""
from __future__ import annotations

import numpy as np
from mindspore import Tensor, jit, ops

from cogvlm2.layers import apply_rope, rms_norm, swiglu


class LayerGraphs:
    def __init__(self, kernels, rope_in_graph: bool):
        gemm = lambda x, w: kernels.expert_linear(x, x.shape[0], w, w, None)  # noqa: E731  (language rows only)

        def pre_attention(x: Tensor, norm_w: Tensor, qkv_w: Tensor, cos: Tensor, sin: Tensor, eps: float,
                          heads: int, kv_heads: int, head_dim: int) -> Tensor | tuple[Tensor, Tensor, Tensor]:
            n = x.shape[0]
            qkv = gemm(rms_norm(x, norm_w, eps), qkv_w)
            if not rope_in_graph:  # one output, [n, H + 2 KV, d]: the attention kernel splits it
                return qkv.reshape(n, heads + 2 * kv_heads, head_dim)
            q = qkv[:, :heads * head_dim].reshape(n, heads, head_dim)
            k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].reshape(n, kv_heads, head_dim)
            v = qkv[:, (heads + kv_heads) * head_dim:].reshape(n, kv_heads, head_dim)
            return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

        def post_attention(x: Tensor, attn: Tensor, dense_w: Tensor, norm_w: Tensor, gate_up_w: Tensor,
                           down_w: Tensor, eps: float) -> Tensor:
            x = x + gemm(attn, dense_w)
            return x + gemm(swiglu(gemm(rms_norm(x, norm_w, eps), gate_up_w)), down_w)

        self.rope_in_graph = rope_in_graph
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
