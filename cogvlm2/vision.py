"""EVA2-CLIP vision encoder + the 2x2 conv / GLU adapter, producing one image's boi + patch + eoi embeddings."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
from mindspore import Tensor, ops

from cogvlm2.config import CogVLM2Config
from cogvlm2.layers import fp32_tensor, layer_norm, softmax_attention, swiglu
from cogvlm2.weights import tensor_shape

if TYPE_CHECKING:
    from kernels.interface import KernelSet

PREFIX = "model.vision."


@dataclass
class VisionLayerWeights:
    ln_in_w: Tensor
    ln_in_b: Tensor
    qkv_w: Tensor
    qkv_b: Tensor
    dense_w: Tensor
    dense_b: Tensor
    ln_post_w: Tensor
    ln_post_b: Tensor
    fc1_w: Tensor
    fc1_b: Tensor
    fc2_w: Tensor
    fc2_b: Tensor


def _no_reduce(x: Tensor) -> Tensor:
    return x


class _Prefixed:
    """tensors[prefix + name] as t[name]."""

    def __init__(self, tensors: Mapping[str, np.ndarray], prefix: str):
        self.tensors, self.prefix = tensors, prefix

    def __getitem__(self, name: str) -> np.ndarray:
        return self.tensors[self.prefix + name]


class VisionEncoder:
    """pixel_values [B, 3, S, S] -> features [B, tokens_per_image, lm_hidden].

    Its transformer layers may hold a slice of the heads and of the MLP (tensor parallelism, cogvlm2/parallel.py):
    the head count comes from the QKV weight it is given, and `reduce` sums the partial outputs of the dense and
    fc2 projections across ranks (their biases are held by one rank only, so they are added once)."""

    def __init__(self, config: CogVLM2Config, tensors: Mapping[str, np.ndarray], kernels: KernelSet,
                 reduce: Callable[[Tensor], Tensor] = _no_reduce):
        """`kernels`: the kernel set whose linear (and weight layout) the projections use."""
        self.config = config
        self.kernels = kernels
        self.reduce = reduce
        weight = self.kernels.prepare_weight
        v = config.vision
        t = _Prefixed(tensors, PREFIX)  # read tensor by tensor: a lazy mapping stays lazy
        qkv_rows = tensor_shape(tensors, PREFIX + "transformer.layers.0.attention.query_key_value.weight")[0]
        self.num_heads = qkv_rows // (3 * v.head_dim)  # this rank's, under tensor parallelism
        # Conv kernels with stride == kernel size are matmuls over flattened patches: [out, in * k * k].
        self.patch_w = weight(t["patch_embedding.proj.weight"].reshape(v.hidden_size, -1))
        self.patch_b = fp32_tensor(t["patch_embedding.proj.bias"])
        self.cls = fp32_tensor(t["patch_embedding.cls_embedding"].reshape(1, v.hidden_size))
        self.pos = fp32_tensor(t["patch_embedding.position_embedding.weight"])
        self.layers = [self._layer(t, f"transformer.layers.{j}.") for j in range(v.num_hidden_layers)]
        # The adapter keeps the compute dtype under weight quantization (measured on the shared fixture: its linears
        # in int8 move image_chat's greedy tokens at a reference top-2 margin of 0.19); it is ~1% of the model.
        # A quantized checkpoint leaves it unquantized for the same reason (weights.UNQUANTIZED_PREFIXES).
        adapter = lambda w: self.kernels.prepare_weight(w, quantize=False)  # noqa: E731
        self.conv_w = adapter(t["conv.weight"].reshape(v.hidden_size, -1))
        self.conv_b = fp32_tensor(t["conv.bias"])
        self.proj_w = adapter(t["linear_proj.linear_proj.weight"])
        self.norm_w = fp32_tensor(t["linear_proj.norm1.weight"])
        self.norm_b = fp32_tensor(t["linear_proj.norm1.bias"])
        self.gate_up_w = adapter(np.concatenate([t["linear_proj.gate_proj.weight"],
                                                 t["linear_proj.dense_h_to_4h.weight"]]))
        self.down_w = adapter(t["linear_proj.dense_4h_to_h.weight"])
        self.boi = fp32_tensor(t["boi"].reshape(1, config.hidden_size))
        self.eoi = fp32_tensor(t["eoi"].reshape(1, config.hidden_size))

    def _layer(self, t: _Prefixed, p: str) -> VisionLayerWeights:
        get = lambda name: fp32_tensor(t[p + name])  # noqa: E731
        weight = lambda name: self.kernels.prepare_weight(t[p + name])  # noqa: E731
        return VisionLayerWeights(
            get("input_layernorm.weight"), get("input_layernorm.bias"),
            weight("attention.query_key_value.weight"), get("attention.query_key_value.bias"),
            weight("attention.dense.weight"), get("attention.dense.bias"),
            get("post_attention_layernorm.weight"), get("post_attention_layernorm.bias"),
            weight("mlp.fc1.weight"), get("mlp.fc1.bias"), weight("mlp.fc2.weight"), get("mlp.fc2.bias"))

    def __call__(self, pixel_values: np.ndarray) -> Tensor:
        """All images of a step in one pass: every projection is one GEMM over all their tokens, attention is
        batched over (image, head)."""
        v = self.config.vision
        b, g, p, t = pixel_values.shape[0], v.grid_size, v.patch_size, v.grid_size ** 2 + 1
        pixels = Tensor.from_numpy(np.ascontiguousarray(pixel_values, np.float32))
        patches = pixels.reshape(b, 3, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(b * g * g, 3 * p * p)
        embedded = self.kernels.linear(patches, self.patch_w, self.patch_b).reshape(b, g * g, v.hidden_size)
        x = ops.concat((ops.broadcast_to(self.cls.reshape(1, 1, -1), (b, 1, v.hidden_size)), embedded), 1)
        x = (x + self.pos).reshape(b * t, v.hidden_size)
        for layer in self.layers:
            x = self._transformer_layer(x, layer, b)
        return self._adapter(x.reshape(b, t, v.hidden_size)[:, 1:], b)

    def _adapter(self, x: Tensor, b: int) -> Tensor:
        """[B, grid^2, vision hidden] -> the 2x2 conv, the GLU projection, boi/eoi: [B, tokens_per_image, hidden]."""
        v, h = self.config.vision, self.config.hidden_size
        half = v.grid_size // 2
        x = x.reshape(b, half, 2, half, 2, v.hidden_size).transpose(0, 1, 3, 5, 2, 4)
        x = self.kernels.linear(x.reshape(b * half * half, v.hidden_size * 4), self.conv_w, self.conv_b)
        y = self.kernels.gelu(layer_norm(self.kernels.linear(x, self.proj_w), self.norm_w, self.norm_b, 1e-5))
        y = self.kernels.linear(swiglu(self.kernels.linear(y, self.gate_up_w)), self.down_w).reshape(b, -1, h)
        edge = lambda e: ops.broadcast_to(e.reshape(1, 1, h), (b, 1, h))  # noqa: E731
        return ops.concat((edge(self.boi), y, edge(self.eoi)), 1)

    def _transformer_layer(self, x: Tensor, w: VisionLayerWeights, b: int) -> Tensor:
        """x [B * T, hidden]: B images of T tokens each."""
        v = self.config.vision
        n, heads, hd = x.shape[0], self.num_heads, v.head_dim
        t = n // b
        linear = self.kernels.linear
        qkv = linear(x, w.qkv_w, w.qkv_b).reshape(b, t, 3, heads, hd).transpose(2, 0, 3, 1, 4)
        qkv = qkv.reshape(3, b * heads, t, hd)
        attn = _chunked_attention(qkv[0], qkv[1], qkv[2], hd ** -0.5)
        attn = attn.reshape(b, heads, t, hd).transpose(0, 2, 1, 3).reshape(n, heads * hd)
        x = x + layer_norm(self.reduce(linear(attn, w.dense_w, w.dense_b)), w.ln_in_w, w.ln_in_b, v.layer_norm_eps)
        mlp = self.reduce(self._mlp(x, w))
        return x + layer_norm(mlp, w.ln_post_w, w.ln_post_b, v.layer_norm_eps)

    def _mlp(self, x: Tensor, w: VisionLayerWeights) -> Tensor:
        """fc2(gelu(fc1(x))) over chunks of tokens whose fc1 activations fit MLP_ACTIVATIONS_BUDGET (row-wise math:
        the same values as one call)."""
        n, per_call = x.shape[0], max(1, MLP_ACTIVATIONS_BUDGET // (w.fc1_b.shape[0] * 4))
        if n <= per_call:
            return self._mlp_rows(x, w)
        return ops.concat([self._mlp_rows(x[i:i + per_call], w) for i in range(0, n, per_call)], 0)

    def _mlp_rows(self, x: Tensor, w: VisionLayerWeights) -> Tensor:
        return self.kernels.linear(self.kernels.gelu(self.kernels.linear(x, w.fc1_w, w.fc1_b)), w.fc2_w, w.fc2_b)


# The most bytes of fp32 fc1 activations one vision MLP call holds: a 1344x1344 image's 9,217 tokens x 15,360 would
# be 566 MB per copy.
MLP_ACTIVATIONS_BUDGET = 128 * 2 ** 20

# The most bytes of fp32 scores one attention call materialises: a 1344x1344 image (9,217 tokens, 16 heads) would
# otherwise hold 5.4 GB of scores and as much of probabilities at once.
ATTENTION_SCORES_BUDGET = 256 * 2 ** 20


def _chunked_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """softmax_attention over [G, T, hd] in groups of (image, head) pairs whose scores fit the budget (the same
    math: each head's attention is computed whole)."""
    groups, tokens = q.shape[0], q.shape[1]
    per_call = max(1, ATTENTION_SCORES_BUDGET // (tokens * tokens * 4))
    if per_call >= groups:
        return softmax_attention(q, k, v, None, scale)
    return ops.concat([softmax_attention(q[i:i + per_call], k[i:i + per_call], v[i:i + per_call], None, scale)
                       for i in range(0, groups, per_call)], 0)
