"""CogVLM2 for causal LM: vision encoder + language model with the visual expert, over a flat batch of tokens."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from mindspore import Tensor, ops

from cogvlm2.config import CogVLM2Config
from cogvlm2.language_model import Attention, LanguageModel
from cogvlm2.model_source import ModelSource, resolve_model
from cogvlm2.runtime import configure_mindspore
from cogvlm2.vision import VisionEncoder


class RoutedAttention(Attention, Protocol):
    def prepare(self, order: np.ndarray) -> None:
        """Called with the routed order (batch positions, language tokens first) before the layers run; may be
        called earlier by the caller (host-side preparation), in which case a repeat call is a no-op."""


@dataclass
class TokenBatch:
    """One forward pass over a flat batch of tokens (any mix of sequences and prefill/decode), in batch order.

    `image_features` holds, in batch order, one row per token whose embedding is replaced by a vision feature
    (token type 1); `image_positions` are those tokens' batch positions.
    """
    token_ids: np.ndarray
    position_ids: np.ndarray
    vision_expert: np.ndarray
    logits_positions: np.ndarray
    image_features: Tensor | None = None
    image_positions: np.ndarray | None = None
    _routing: tuple[np.ndarray, int] | None = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def routing(self) -> tuple[np.ndarray, int]:
        if self._routing is None:
            self._routing = routing_order(self.vision_expert)
        return self._routing


def routing_order(vision_expert: np.ndarray) -> tuple[np.ndarray, int]:
    """Batch positions with language-expert tokens first (stable), and how many language tokens there are."""
    order = np.argsort(vision_expert.astype(np.int8), kind="stable")
    return order, int(vision_expert.shape[0] - np.count_nonzero(vision_expert))


class CogVLM2Model:
    def __init__(self, config: CogVLM2Config, tensors: dict[str, np.ndarray], inv_freq: np.ndarray | None = None,
                 kernels=None):
        """`kernels`: a kernels.registry.KernelSet for the decoder's hot ops (default: the reference composites)."""
        configure_mindspore()
        self.config = config
        self.vision = VisionEncoder(config, tensors, kernels)
        self.language = LanguageModel(config, tensors, inv_freq, kernels)

    @property
    def kernels(self):
        return self.language.kernels

    @classmethod
    def from_source(cls, source: ModelSource, kernels=None) -> "CogVLM2Model":
        from cogvlm2.weights import load_weights
        weights = load_weights(source)
        return cls(source.config, weights.tensors, weights.inv_freq, kernels)

    @classmethod
    def from_pretrained(cls, spec: str | None = None) -> "CogVLM2Model":
        return cls.from_source(resolve_model(spec))

    def encode_images(self, pixel_values: np.ndarray) -> Tensor:
        """[B, 3, S, S] -> [B, tokens_per_image, hidden]."""
        return self.vision(pixel_values)

    def embed(self, batch: TokenBatch) -> Tensor:
        embeds = self.language.embed(batch.token_ids)
        if batch.image_features is None or batch.image_positions is None or len(batch.image_positions) == 0:
            return embeds
        idx = Tensor.from_numpy(batch.image_positions.astype(np.int32).reshape(-1, 1))
        return ops.tensor_scatter_update(embeds, idx, batch.image_features)

    def hidden_states(self, batch: TokenBatch, attention: RoutedAttention) -> tuple[Tensor, np.ndarray]:
        """Final-normed hidden states in routed order, and the routed order itself."""
        order, num_language = batch.routing
        attention.prepare(order)
        embeds = ops.gather(self.embed(batch), Tensor.from_numpy(order.astype(np.int32)), 0)
        return self.language.forward(embeds, batch.position_ids[order], num_language, attention), order

    def forward(self, batch: TokenBatch, attention: RoutedAttention) -> Tensor:
        """Logits [len(batch.logits_positions), vocab] for the requested batch positions only."""
        hidden, order = self.hidden_states(batch, attention)
        routed_position = np.empty_like(order)
        routed_position[order] = np.arange(order.shape[0])
        rows = Tensor.from_numpy(routed_position[batch.logits_positions].astype(np.int32))
        return self.language.logits(ops.gather(hidden, rows, 0))
