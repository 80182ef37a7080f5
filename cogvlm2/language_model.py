"""LLaMA-3 decoder with CogVLM2's visual expert.

Tokens enter a forward pass in *routed order*: every language-expert token first, then every vision-expert token.
Each expert projection is then two contiguous matmuls (one per expert) with no gather/scatter per layer, and each
token is computed by exactly one expert. Attention does not care about the order: it knows each token's sequence
and index from its own metadata, built by whoever built the batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
from mindspore import Tensor, ops

from cogvlm2.config import CogVLM2Config
from cogvlm2.layers import fp32_tensor
from cogvlm2.rope import default_inv_freq, rope_table
from kernels.quantization import concat_rows

if TYPE_CHECKING:
    from kernels.interface import KernelSet


@dataclass
class RopeInputs:
    """What attention needs to rotate q and k: each token's position id (routed order) and the model's tables."""
    positions: Tensor  # [N] int32
    cos_table: Tensor  # [max_position_embeddings, head_dim]
    sin_table: Tensor


class Attention(Protocol):
    """qkv [N, H + 2 KV, d]: the layer's fused projection, unrotated, in routed order. Rotates q and k by `rope`,
    writes K/V into its cache, attends, and returns [N, H * d]."""

    def __call__(self, layer: int, qkv: Tensor, rope: RopeInputs) -> Tensor: ...


@dataclass
class DecoderLayerWeights:
    input_norm: Tensor
    post_norm: Tensor
    language_qkv: Tensor
    vision_qkv: Tensor
    vision_qkv_bias: Tensor
    language_dense: Tensor
    vision_dense: Tensor
    language_gate_up: Tensor  # gate and up stacked [2 * intermediate, hidden]: one GEMM, gate first
    language_down: Tensor
    vision_gate_up: Tensor
    vision_down: Tensor


class LanguageModel:
    def __init__(self, config: CogVLM2Config, tensors: dict[str, np.ndarray], inv_freq: np.ndarray | None,
                 kernels: KernelSet):
        self.config = config
        self.kernels = kernels
        self.embed_table = np.ascontiguousarray(tensors["model.embed_tokens.weight"])  # storage dtype, rows on the host
        self.final_norm = fp32_tensor(tensors["model.norm.weight"])
        self.lm_head = self.kernels.prepare_weight(tensors["lm_head.weight"])
        self.layers = [self._layer(tensors, f"model.layers.{i}.") for i in range(config.num_hidden_layers)]
        if inv_freq is None:
            inv_freq = default_inv_freq(config.head_dim, config.rope_theta)
        cos, sin = rope_table(inv_freq, config.max_position_embeddings)
        self.cos_table, self.sin_table = fp32_tensor(cos), fp32_tensor(sin)
        # heads held by this process (fewer under tensor parallelism, see cogvlm2/parallel.py)
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_kv_heads

    def _layer(self, t: dict[str, np.ndarray], p: str) -> DecoderLayerWeights:
        """Norms and the bias as they are; projection weights in the kernels' layout, gate and up stacked."""
        weight = lambda name: self.kernels.prepare_weight(t[p + name])  # noqa: E731
        gate_up = lambda mlp: self.kernels.prepare_weight(  # noqa: E731
            concat_rows([t[f"{p}mlp.{mlp}.gate_proj.weight"], t[f"{p}mlp.{mlp}.up_proj.weight"]]))
        return DecoderLayerWeights(
            fp32_tensor(t[p + "input_layernorm.weight"]), fp32_tensor(t[p + "post_attention_layernorm.weight"]),
            weight("self_attn.language_expert_query_key_value.weight"),
            weight("self_attn.vision_expert_query_key_value.weight"),
            fp32_tensor(t[p + "self_attn.vision_expert_query_key_value.bias"]),
            weight("self_attn.language_expert_dense.weight"), weight("self_attn.vision_expert_dense.weight"),
            gate_up("language_mlp"), weight("mlp.language_mlp.down_proj.weight"),
            gate_up("vision_mlp"), weight("mlp.vision_mlp.down_proj.weight"))

    def embed(self, token_ids: np.ndarray) -> Tensor:
        """Embedding rows gathered on the host from the table in its storage dtype, widened to float32 (MindSpore's
        CPU Gather has no bf16; a step's rows are few next to the GEMMs)."""
        return fp32_tensor(self.embed_table[token_ids])

    def forward(self, hidden: Tensor, position_ids: np.ndarray, num_language: int, attention: Attention) -> Tensor:
        """hidden [N, hidden] and position_ids [N], both in routed order. Returns the final-normed hidden states."""
        rope = RopeInputs(Tensor.from_numpy(position_ids.astype(np.int32)), self.cos_table, self.sin_table)
        for i, layer in enumerate(self.layers):
            hidden = self._decoder_layer(i, layer, hidden, num_language, rope, attention)
        return self.kernels.rms_norm(hidden, self.final_norm, self.config.rms_norm_eps)

    @property
    def qkv_heads(self) -> int:
        """Heads of the fused QKV projection held here: query heads, then K heads, then V heads."""
        return self.num_heads + 2 * self.num_kv_heads

    def logits(self, hidden: Tensor) -> Tensor:
        return self.kernels.linear(hidden, self.lm_head)

    partial_products = False  # whether row-parallel projections give partial sums, to be reduced (cogvlm2/parallel.py)

    def reduce(self, x: Tensor) -> Tensor:
        """Sums the partial outputs of row-parallel projections across tensor-parallel ranks (none here)."""
        return x

    def _decoder_layer(self, index: int, w: DecoderLayerWeights, x: Tensor, num_language: int, rope: RopeInputs,
                       attention: Attention) -> Tensor:
        c, k = self.config, self.kernels
        h = k.rms_norm(x, w.input_norm, c.rms_norm_eps)
        qkv = k.expert_linear(h, num_language, w.language_qkv, w.vision_qkv, w.vision_qkv_bias)
        attn = attention(index, qkv.reshape(x.shape[0], self.qkv_heads, c.head_dim), rope)
        x = self._add_projection(x, attn, num_language, w.language_dense, w.vision_dense)
        h = k.rms_norm(x, w.post_norm, c.rms_norm_eps)
        gate_up = k.expert_linear(h, num_language, w.language_gate_up, w.vision_gate_up, None)
        return self._add_projection(x, k.swiglu(gate_up), num_language, w.language_down, w.vision_down)

    def _add_projection(self, x: Tensor, h: Tensor, num_language: int, wl: Tensor, wv: Tensor) -> Tensor:
        """x + a row-parallel projection of h: the residual add inside the GEMM, unless tensor parallelism must
        first sum the projection's partial products across ranks."""
        if self.partial_products:
            return x + self.reduce(self.kernels.expert_linear(h, num_language, wl, wv, None))
        return self.kernels.expert_linear(h, num_language, wl, wv, None, residual=x)
