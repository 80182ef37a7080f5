"""Compiled (mindspore.jit) segments of a decoder layer for language-expert-only token sets.

Decode steps and text prefills (every token on the language expert) run each layer's two dense segments as graphs
compiled once per token-count bucket; the weights are graph inputs, so one compiled graph serves every layer.
Attention runs between the two segments, outside the graph, over the real (unpadded) tokens.
"""
from __future__ import annotations

import numpy as np
from mindspore import Tensor, jit, ops

from cogvlm2.layers import apply_rope, linear, rms_norm


def _pre_attention(x: Tensor, norm_w: Tensor, qkv_w: Tensor, cos: Tensor, sin: Tensor, eps: float, heads: int,
                   kv_heads: int, head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    n = x.shape[0]
    qkv = linear(rms_norm(x, norm_w, eps), qkv_w)
    q = apply_rope(qkv[:, :heads * head_dim].reshape(n, heads, head_dim), cos, sin)
    k = apply_rope(qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].reshape(n, kv_heads, head_dim), cos, sin)
    v = qkv[:, (heads + kv_heads) * head_dim:].reshape(n, kv_heads, head_dim)
    return q, k, v


def _post_attention(x: Tensor, attn: Tensor, dense_w: Tensor, norm_w: Tensor, gate_w: Tensor, up_w: Tensor,
                    down_w: Tensor, eps: float) -> Tensor:
    x = x + linear(attn, dense_w)
    h = rms_norm(x, norm_w, eps)
    return x + linear(ops.silu(linear(h, gate_w)) * linear(h, up_w), down_w)


pre_attention_graph = jit(_pre_attention)
post_attention_graph = jit(_post_attention)


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
