"""LLaMA-3 decoder with CogVLM2's visual expert.

Tokens enter a forward pass in *routed order*: every language-expert token first, then every vision-expert token.
Each expert projection is then two contiguous matmuls (one per expert) with no gather/scatter per layer, and each
token is computed by exactly one expert. Attention does not care about the order: it receives each token's
sequence index through its own metadata (`Attention.begin_step`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
from mindspore import Tensor, ops

from cogvlm2 import graphs
from cogvlm2.config import CogVLM2Config
from cogvlm2.layers import apply_rope, expert_linear, rms_norm, split_qkv, swiglu, to_tensor  # noqa: F401
from cogvlm2.rope import default_inv_freq, rope_table


class Attention(Protocol):
    """Writes this step's K/V into the cache and attends. q [N, H, d], k and v [N, KV, d] -> [N, H * d].

    An attention whose `fuses_rope` is True rotates q and k itself: the model then hands it
    `rope = (position ids, cos table, sin table)` before the layers and passes q and k unrotated. One that also
    has `attend_qkv(layer, qkv)` may be handed the fused projection [N, H + 2 KV, d] instead of q, k and v."""

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor: ...


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
                 kernels=None):
        from kernels.registry import get_kernels
        self.config = config
        self.kernels = kernels if kernels is not None else get_kernels("reference")
        self.embed_table = to_tensor(tensors["model.embed_tokens.weight"])
        self.final_norm = to_tensor(tensors["model.norm.weight"])
        self.lm_head = self.kernels.prepare_weight(tensors["lm_head.weight"])
        self.layers = [self._layer(tensors, f"model.layers.{i}.") for i in range(config.num_hidden_layers)]
        if inv_freq is None:
            inv_freq = default_inv_freq(config.head_dim, config.rope_theta)
        cos, sin = rope_table(inv_freq, config.max_position_embeddings)
        self.cos_table, self.sin_table = to_tensor(cos), to_tensor(sin)
        self.graph_buckets: list[int] = []  # token-count buckets of the compiled language-only path; [] = off
        self.graphs: graphs.LayerGraphs | None = None
        self._rope_placeholders: dict[int, Tensor] = {}
        # heads held by this process (fewer under tensor parallelism, see cogvlm2/parallel.py)
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_kv_heads

    def _layer(self, t: dict[str, np.ndarray], p: str) -> DecoderLayerWeights:
        """Norms and the bias as they are; projection weights in the kernels' layout, gate and up stacked."""
        weight = lambda name: self.kernels.prepare_weight(t[p + name])  # noqa: E731
        gate_up = lambda mlp: self.kernels.prepare_weight(  # noqa: E731
            np.concatenate([t[f"{p}mlp.{mlp}.gate_proj.weight"], t[f"{p}mlp.{mlp}.up_proj.weight"]]))
        return DecoderLayerWeights(
            to_tensor(t[p + "input_layernorm.weight"]), to_tensor(t[p + "post_attention_layernorm.weight"]),
            weight("self_attn.language_expert_query_key_value.weight"),
            weight("self_attn.vision_expert_query_key_value.weight"),
            to_tensor(t[p + "self_attn.vision_expert_query_key_value.bias"]),
            weight("self_attn.language_expert_dense.weight"), weight("self_attn.vision_expert_dense.weight"),
            gate_up("language_mlp"), weight("mlp.language_mlp.down_proj.weight"),
            gate_up("vision_mlp"), weight("mlp.vision_mlp.down_proj.weight"))

    def embed(self, token_ids: np.ndarray) -> Tensor:
        return ops.gather(self.embed_table, Tensor.from_numpy(token_ids.astype(np.int32)), 0)

    def rope(self, position_ids: np.ndarray) -> tuple[Tensor, Tensor]:
        idx = Tensor.from_numpy(position_ids.astype(np.int32))
        return ops.gather(self.cos_table, idx, 0), ops.gather(self.sin_table, idx, 0)

    def forward(self, hidden: Tensor, position_ids: np.ndarray, num_language: int, attention: Attention) -> Tensor:
        """hidden [N, hidden] and position_ids [N], both in routed order. Returns the final-normed hidden states."""
        if getattr(attention, "fuses_rope", False):
            attention.rope = (Tensor.from_numpy(position_ids.astype(np.int32)), self.cos_table, self.sin_table)
            cos = sin = None
        else:
            cos, sin = self.rope(position_ids)
        n = hidden.shape[0]
        bucket = graphs.bucket_for(n, self.graph_buckets) if num_language == n else None
        if bucket is not None and self.graphs.rope_in_graph != (cos is not None):
            bucket = None  # compiled for the other kind of attention: run eagerly
        if bucket is not None:
            hidden = self._compiled_layers(hidden, cos, sin, bucket, attention)
        else:
            for i, layer in enumerate(self.layers):
                hidden = self._decoder_layer(i, layer, hidden, cos, sin, num_language, attention)
        return rms_norm(hidden, self.final_norm, self.config.rms_norm_eps)

    def enable_graphs(self, max_tokens: int, rope_in_graph: bool = True, progress: bool = True) -> None:
        """Compile the language-only layer segments for every token bucket up to max_tokens (start-up warm-up).
        rope_in_graph=False when the engine's attention fuses RoPE."""
        from tqdm import tqdm
        buckets = graphs.token_buckets(max_tokens)
        self.graphs = graphs.LayerGraphs(self.kernels, rope_in_graph)
        c, w = self.config, self.layers[0]
        for size in tqdm(buckets, desc="Compiling decoder graphs", unit="bucket", disable=not progress):
            x = graphs.zeros(size, c.hidden_size)
            cos = graphs.zeros(size, c.head_dim)
            self.graphs.pre_attention(x, w.input_norm, w.language_qkv, cos, cos, c.rms_norm_eps, self.num_heads,
                                      self.num_kv_heads, c.head_dim)
            attn = graphs.zeros(size, self.num_heads * c.head_dim)
            self.graphs.post_attention(x, attn, w.language_dense, w.post_norm, w.language_gate_up, w.language_down,
                                       c.rms_norm_eps)
        self.graph_buckets = buckets

    def _compiled_layers(self, hidden: Tensor, cos: Tensor | None, sin: Tensor | None, bucket: int,
                         attention: Attention) -> Tensor:
        c, g = self.config, self.graphs
        n = hidden.shape[0]
        x = graphs.pad_rows(hidden, bucket)
        if cos is None:  # RoPE happens in the attention kernel: the graph ignores these inputs
            cos = sin = self._unused_rope_input(bucket)
        else:
            cos, sin = graphs.pad_rows(cos, bucket), graphs.pad_rows(sin, bucket)
        for i, w in enumerate(self.layers):
            out = g.pre_attention(x, w.input_norm, w.language_qkv, cos, sin, c.rms_norm_eps, self.num_heads,
                                  self.num_kv_heads, c.head_dim)
            if g.rope_in_graph:
                q, k, v = (t[:n] for t in out) if bucket != n else out
                attn = attention(i, q, k, v)
            else:
                attn = self._attend_fused(attention, i, out[:n] if bucket != n else out)
            attn = graphs.pad_rows(attn, bucket)
            x = g.post_attention(x, attn, w.language_dense, w.post_norm, w.language_gate_up, w.language_down,
                                 c.rms_norm_eps)
        return x[:n] if bucket != n else x

    def _attend_fused(self, attention: Attention, layer: int, qkv: Tensor) -> Tensor:
        """Attention over the fused QKV [n, H + 2 KV, d]: handed over whole when the attention takes it."""
        attend_qkv = getattr(attention, "attend_qkv", None)
        if attend_qkv is not None:
            return attend_qkv(layer, qkv)
        return attention(layer, *split_qkv(qkv, self.num_kv_heads))

    def _unused_rope_input(self, bucket: int) -> Tensor:
        if bucket not in self._rope_placeholders:
            self._rope_placeholders[bucket] = graphs.zeros(bucket, self.config.head_dim)
        return self._rope_placeholders[bucket]

    def logits(self, hidden: Tensor) -> Tensor:
        return self.kernels.linear(hidden, self.lm_head)

    def reduce(self, x: Tensor) -> Tensor:
        """Sums the partial outputs of row-parallel projections across tensor-parallel ranks (none here)."""
        return x

    def _decoder_layer(self, index: int, w: DecoderLayerWeights, x: Tensor, cos: Tensor, sin: Tensor,
                       num_language: int, attention: Attention) -> Tensor:
        c = self.config
        n, heads, kv, hd = x.shape[0], self.num_heads, self.num_kv_heads, c.head_dim
        h = rms_norm(x, w.input_norm, c.rms_norm_eps)
        project = self.kernels.expert_linear
        qkv = project(h, num_language, w.language_qkv, w.vision_qkv, w.vision_qkv_bias)
        q = qkv[:, :heads * hd].reshape(n, heads, hd)
        k = qkv[:, heads * hd:(heads + kv) * hd].reshape(n, kv, hd)
        v = qkv[:, (heads + kv) * hd:].reshape(n, kv, hd)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        attn = attention(index, q, k, v)
        x = x + self.reduce(project(attn, num_language, w.language_dense, w.vision_dense, None))
        h = rms_norm(x, w.post_norm, c.rms_norm_eps)
        gate_up = project(h, num_language, w.language_gate_up, w.vision_gate_up, None)
        return x + self.reduce(project(swiglu(gate_up), num_language, w.language_down, w.vision_down, None))
