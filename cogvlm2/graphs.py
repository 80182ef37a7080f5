"""Compiled (mindspore.jit) segments of a decoder layer for language-expert-only token sets.

Decode steps and text prefills (every token on the language expert) run each layer's two dense segments as graphs
compiled once per token-count bucket; the weights are graph inputs, so one compiled graph serves every layer.
Attention runs between the two segments, outside the graph, over the real (unpadded) tokens. The GEMMs go
through the engine's kernel set (a custom GEMM op works inside jit); RoPE is in the first graph unless the
attention kernel fuses it.
"""
from __future__ import annotations

import numpy as np
from mindspore import Tensor, jit, ops

from cogvlm2.layers import apply_rope, rms_norm


class LayerGraphs:
    def __init__(self, kernels, rope_in_graph: bool):
        gemm = lambda x, w: kernels.expert_linear(x, x.shape[0], w, w, None)  # noqa: E731  (language rows only)

        def pre_attention(x: Tensor, norm_w: Tensor, qkv_w: Tensor, cos: Tensor, sin: Tensor, eps: float,
                          heads: int, kv_heads: int, head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
            n = x.shape[0]
            qkv = gemm(rms_norm(x, norm_w, eps), qkv_w)
            q = qkv[:, :heads * head_dim].reshape(n, heads, head_dim)
            k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].reshape(n, kv_heads, head_dim)
            v = qkv[:, (heads + kv_heads) * head_dim:].reshape(n, kv_heads, head_dim)
            if rope_in_graph:
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            return q, k, v

        def post_attention(x: Tensor, attn: Tensor, dense_w: Tensor, norm_w: Tensor, gate_w: Tensor, up_w: Tensor,
                           down_w: Tensor, eps: float) -> Tensor:
            x = x + gemm(attn, dense_w)
            h = rms_norm(x, norm_w, eps)
            return x + gemm(ops.silu(gemm(h, gate_w)) * gemm(h, up_w), down_w)

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
