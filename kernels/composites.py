"""The leaf math of the kernels layer: plain MindSpore composites (fp32 on CPU) that the reference backend runs, the
registry falls back on, and the model reuses (cogvlm2.layers re-exports them). Imports only MindSpore and numpy."""
from __future__ import annotations

import numpy as np
from mindspore import Tensor, ops
from mindspore import dtype as mstype

_matmul_nt = ops.MatMul(transpose_b=True)


def to_tensor(array: np.ndarray) -> Tensor:
    """Zero-copy on CPU: the Tensor shares the (contiguous, float32) numpy buffer."""
    return Tensor.from_numpy(np.ascontiguousarray(array))


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [N, in] @ weight[out, in]^T (+ bias): weights stay in checkpoint layout, no transpose is materialised."""
    y = _matmul_nt(x, weight)
    return y if bias is None else y + bias


def split_qkv(qkv: Tensor, num_kv_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """The fused QKV projection [N, H + 2 KV, d] -> q [N, H, d], k [N, KV, d], v [N, KV, d]."""
    heads = qkv.shape[1] - 2 * num_kv_heads
    return qkv[:, :heads], qkv[:, heads:heads + num_kv_heads], qkv[:, heads + num_kv_heads:]


def softmax_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float,
                      bf16_math: bool = False) -> Tensor:
    """q [G, M, d], k/v [G, T, d] -> [G, M, d]; mask is additive, broadcastable to [G, M, T].
    bf16_math: the unnormalised probabilities are rounded to bf16 before P @ V (fp32 accumulation; the softmax's
    max and sum in fp32), as the kernels do for compute dtype bfloat16."""
    if not bf16_math:
        scores = ops.BatchMatMul(transpose_b=True)(q, k) * scale
        if mask is not None:
            scores = scores + mask
        return ops.BatchMatMul()(ops.softmax(scores, axis=-1), v)
    scores = ops.BatchMatMul(transpose_b=True)(q * scale, k)
    if mask is not None:
        scores = scores + mask
    weights = ops.exp(scores - scores.max(axis=-1, keepdims=True))
    return ops.BatchMatMul()(bf16_rounded(weights), v) / weights.sum(axis=-1, keepdims=True)


def bf16_rounded(x: Tensor) -> Tensor:
    """x rounded to the nearest bfloat16 (ties to even), kept in float32."""
    return ops.cast(ops.cast(x, mstype.bfloat16), mstype.float32)


def expert_linear(x: Tensor, num_language: int, language_w: Tensor, vision_w: Tensor,
                  vision_b: Tensor | None = None, project=linear) -> Tensor:
    """x in routed order: rows [:num_language] through the language weights, the rest through the vision ones (each
    by `project`, linear's signature)."""
    n = x.shape[0]
    if num_language == n:
        return project(x, language_w)
    if num_language == 0:
        return project(x, vision_w, vision_b)
    return ops.concat((project(x[:num_language], language_w), project(x[num_language:], vision_w, vision_b)), 0)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    variance = ops.mean(x * x, -1, keep_dims=True)
    return x * ops.rsqrt(variance + eps) * weight


def swiglu(gate_up: Tensor) -> Tensor:
    """silu(gate) * up of the stacked [N, 2 * F] gate/up projection (gate first)."""
    half = gate_up.shape[-1] // 2
    return ops.silu(gate_up[:, :half]) * gate_up[:, half:]


def gelu(x: Tensor) -> Tensor:
    """The exact GELU, x / 2 * (1 + erf(x / sqrt 2))."""
    return ops.gelu(x, approximate="none")


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """NeoX rotate-half; x [N, heads, d], cos/sin [N, d]."""
    half = x.shape[-1] // 2
    rotated = ops.concat((-x[..., half:], x[..., :half]), -1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def pad_block_tables(block_tables: list[list[int]]) -> np.ndarray:
    """Per-sequence block lists -> [B, max_blocks] int32 (padded with 0; padding is never read)."""
    width = max((len(t) for t in block_tables), default=0) or 1
    table = np.zeros((len(block_tables), width), np.int32)
    for b, blocks in enumerate(block_tables):
        table[b, :len(blocks)] = blocks
    return table
