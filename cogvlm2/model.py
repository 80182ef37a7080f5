"""CogVLM2 for causal LM: vision encoder + language model with the visual expert, over a flat batch of tokens."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from mindspore import Tensor, ops

from cogvlm2.config import CogVLM2Config
from cogvlm2.language_model import Attention, LanguageModel
from cogvlm2.model_source import ModelSource
from cogvlm2.runtime import configure_mindspore
from cogvlm2.vision import VisionEncoder

if TYPE_CHECKING:
    from kernels.interface import KernelSet


@dataclass
class TokenBatch:
    """One forward pass over a flat batch of tokens (any mix of sequences and prefill/decode), in batch order.

    `image_features` holds, in batch order, one row per token whose embedding is replaced by a vision feature
    (token type 1); `image_positions` are those tokens' batch positions. The routed order (language-expert
    tokens first) is computed once, here: whoever builds the attention's metadata reads it from the batch.
    """
    token_ids: np.ndarray
    position_ids: np.ndarray
    vision_expert: np.ndarray
    logits_positions: np.ndarray
    image_features: Tensor | None = None
    image_positions: np.ndarray | None = None
    order: np.ndarray = field(init=False, repr=False)  # batch positions in routed order
    num_language: int = field(init=False)

    def __post_init__(self) -> None:
        self.order = np.argsort(self.vision_expert.astype(np.int8), kind="stable")
        self.num_language = int(self.vision_expert.shape[0] - np.count_nonzero(self.vision_expert))

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])


class CogVLM2Model:
    def __init__(self, config: CogVLM2Config, tensors: Mapping[str, np.ndarray], inv_freq: np.ndarray | None,
                 kernels: KernelSet, with_vision: bool = True):
        """`kernels`: the kernel set (kernels.registry.get_kernels) the decoder's and encoder's hot ops run on.
        Without vision (text-only serving) the encoder and adapter are not built and their tensors never read."""
        configure_mindspore()
        self.config = config
        self.kernels = kernels
        self.vision = VisionEncoder(config, tensors, kernels) if with_vision else None
        self.language = LanguageModel(config, tensors, inv_freq, kernels)

    @classmethod
    def from_source(cls, source: ModelSource, kernels: KernelSet, storage: np.dtype | None = np.dtype(np.float32),
                    with_vision: bool = True) -> "CogVLM2Model":
        """`storage`: the weights' dtype (None: each tensor as the checkpoint stores it; cogvlm2/precision.py)."""
        from cogvlm2.weights import lazy_weights, load_weights
        weights = lazy_weights(source, storage=storage) or load_weights(source, storage=storage)
        return cls(source.config, weights.tensors, weights.inv_freq, kernels, with_vision)

    def encode_images(self, pixel_values: np.ndarray) -> Tensor:
        """[B, 3, S, S] -> [B, tokens_per_image, hidden]."""
        return self.vision(pixel_values)

    @staticmethod
    def _has_images(batch: TokenBatch) -> bool:
        return batch.image_features is not None and batch.image_positions is not None and \
            len(batch.image_positions) > 0

    def embed(self, batch: TokenBatch) -> Tensor:
        embeds = self.language.embed(batch.token_ids)
        if not self._has_images(batch):
            return embeds
        idx = Tensor.from_numpy(batch.image_positions.astype(np.int32).reshape(-1, 1))
        return ops.tensor_scatter_update(embeds, idx, batch.image_features)

    def hidden_states(self, batch: TokenBatch, attention: Attention) -> Tensor:
        """Final-normed hidden states in routed order (batch.order). Without images the embedding rows are
        gathered on the host straight in routed order: a device gather costs a MindSpore op per step."""
        order = batch.order
        if self._has_images(batch):
            embeds = ops.gather(self.embed(batch), Tensor.from_numpy(order.astype(np.int32)), 0)
        else:
            embeds = self.language.embed(batch.token_ids[order])
        return self.language.forward(embeds, batch.position_ids[order], batch.num_language, attention)

    def forward(self, batch: TokenBatch, attention: Attention) -> Tensor:
        """Logits [len(batch.logits_positions), vocab] for the requested batch positions only (every row as it is
        when they are all of them in routed order, as in a decode step: no gather)."""
        hidden = self.hidden_states(batch, attention)
        routed_position = np.empty_like(batch.order)
        routed_position[batch.order] = np.arange(batch.order.shape[0])
        rows = routed_position[batch.logits_positions]
        if np.array_equal(rows, np.arange(batch.order.shape[0])):
            return self.language.logits(hidden)
        return self.language.logits(ops.gather(hidden, Tensor.from_numpy(rows.astype(np.int32)), 0))
