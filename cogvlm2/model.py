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
    def _routed_rows(batch: TokenBatch, positions: np.ndarray) -> np.ndarray:
        """The rows in routed order (batch.order) of the tokens at batch `positions`."""
        routed = np.empty_like(batch.order)
        routed[batch.order] = np.arange(batch.order.shape[0])
        return routed[positions]

    def embed(self, batch: TokenBatch) -> Tensor:
        """The batch's embeddings in routed order: the table's rows gathered on the host straight in that order (a
        device gather would cost a MindSpore op per step), the image features written over their tokens' rows."""
        embeds = self.language.embed(batch.token_ids[batch.order])
        if batch.image_features is None or batch.image_positions is None or len(batch.image_positions) == 0:
            return embeds
        rows = self._routed_rows(batch, batch.image_positions)
        return ops.tensor_scatter_update(embeds, Tensor.from_numpy(rows.astype(np.int32).reshape(-1, 1)),
                                         batch.image_features)

    def hidden_states(self, batch: TokenBatch, attention: Attention) -> Tensor:
        """Final-normed hidden states in routed order (batch.order)."""
        return self.language.forward(self.embed(batch), batch.position_ids[batch.order], batch.num_language,
                                     attention)

    def forward(self, batch: TokenBatch, attention: Attention) -> Tensor:
        """Logits [len(batch.logits_positions), vocab] for the requested batch positions only (every row as it is
        when they are all of them in routed order, as in a decode step: no gather)."""
        hidden = self.hidden_states(batch, attention)
        if np.array_equal(batch.logits_positions, batch.order):
            return self.language.logits(hidden)
        rows = self._routed_rows(batch, batch.logits_positions)
        return self.language.logits(ops.gather(hidden, Tensor.from_numpy(rows.astype(np.int32)), 0))
