"""Tensor parallelism by attention heads (Megatron-style) on MindSpore's collectives.

Rank r of N holds, of every decoder layer and of both experts:
- QKV (column-parallel): its N-th of the query heads and the KV heads those read; with fewer KV heads than ranks
  each rank holds the one KV head its query heads share (replicated across N / kv_heads ranks);
- dense (row-parallel): the input columns of its query heads; the partial outputs are all-reduced;
- MLP gate/up (column-parallel) and down (row-parallel): its N-th of the intermediate size; down is all-reduced;
- embed_tokens and lm_head: its N-th of the vocabulary. Embedding rows of ids outside the slice are zeroed and the
  result all-reduced; logits stay split by vocabulary slice and the caller concatenates them in rank order.
The vision encoder's transformer layers are split the same way (heads; fc1/fc2; the dense and fc2 biases held by
rank 0 only, so the all-reduce adds them once) when its head count and MLP size divide the number of ranks and
mm_encoder_tp_mode is "weights". Otherwise (or with mm_encoder_tp_mode="data") the encoder is replicated and each
rank encodes its share of a step's images, the features all-gathered. Norms, RoPE, the patch embedding, the 2x2
conv, the GLU adapter, boi and eoi are replicated. Each rank keeps only its slices while the checkpoint streams
through `load_weights`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
from mindspore import Tensor, ops

from cogvlm2.config import CogVLM2Config
from cogvlm2.language_model import LanguageModel
from cogvlm2.model import CogVLM2Model
from cogvlm2.model_source import ModelSource
from cogvlm2.runtime import configure_mindspore
from cogvlm2.vision import PREFIX as VISION_PREFIX
from cogvlm2.vision import VisionEncoder
from kernels.quantization import Int8Rows

if TYPE_CHECKING:
    from kernels.interface import KernelSet


@dataclass(frozen=True)
class Span:
    """Half-open range [start, stop) of heads or rows."""
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class ShardLayout:
    """What rank `rank` of `size` ranks holds."""
    size: int
    rank: int
    heads: Span
    kv_heads: Span
    intermediate: Span
    vocab: Span
    vision_heads: Span | None  # None: the vision encoder is replicated and splits the images instead
    vision_intermediate: Span | None

    @property
    def vision_data_parallel(self) -> bool:
        return self.vision_heads is None


def _even_split(total: int, size: int, rank: int) -> Span:
    step = total // size
    return Span(rank * step, (rank + 1) * step)


def _kv_span(num_kv_heads: int, size: int, rank: int) -> Span:
    if num_kv_heads >= size:
        return _even_split(num_kv_heads, size, rank)
    head = rank // (size // num_kv_heads)  # replicated: the KV head of this rank's query heads
    return Span(head, head + 1)


def check_tensor_parallel(config: CogVLM2Config, size: int) -> None:
    """ValueError naming tensor_parallel_size and the quantity it does not divide."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive int, got {size!r}")
    kv = config.num_kv_heads
    checks = [
        (config.num_attention_heads % size == 0,
         f"the number of attention heads ({config.num_attention_heads})"),
        (kv % size == 0 if kv >= size else size % kv == 0,
         f"the number of KV heads ({kv}) and is not a multiple of it"),
        (config.intermediate_size % size == 0, f"intermediate_size ({config.intermediate_size})"),
        (config.vocab_size % size == 0, f"vocab_size ({config.vocab_size})"),
    ]
    for ok, what in checks:
        if not ok:
            raise ValueError(f"tensor_parallel_size={size} does not divide {what}")


def vision_is_sharded(config: CogVLM2Config, size: int, mm_encoder_tp_mode: str = "weights") -> bool:
    """Whether the vision encoder is split by heads ("weights" mode, when the sizes divide), else replicated."""
    v = config.vision
    return mm_encoder_tp_mode == "weights" and v.num_heads % size == 0 and v.intermediate_size % size == 0


def shard_layout(config: CogVLM2Config, size: int, rank: int, mm_encoder_tp_mode: str = "weights") -> ShardLayout:
    check_tensor_parallel(config, size)
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} is outside tensor_parallel_size={size}")
    sharded = vision_is_sharded(config, size, mm_encoder_tp_mode)
    return ShardLayout(size, rank,
                       heads=_even_split(config.num_attention_heads, size, rank),
                       kv_heads=_kv_span(config.num_kv_heads, size, rank),
                       intermediate=_even_split(config.intermediate_size, size, rank),
                       vocab=_even_split(config.vocab_size, size, rank),
                       vision_heads=_even_split(config.vision.num_heads, size, rank) if sharded else None,
                       vision_intermediate=_even_split(config.vision.intermediate_size, size, rank) if sharded
                       else None)


def kv_heads_per_rank(config: CogVLM2Config, size: int) -> int:
    """KV heads in each rank's cache (all of them when size is 1)."""
    return shard_layout(config, size, 0).kv_heads.size


# ---- slicing checkpoint tensors ---------------------------------------------------------------------------------
def _rows(array: np.ndarray, span: Span, unit: int) -> np.ndarray:
    return array[span.start * unit:span.stop * unit]


def _columns(array: np.ndarray, span: Span, unit: int) -> np.ndarray:
    return array[:, span.start * unit:span.stop * unit]


def _decoder_qkv(array: np.ndarray, config: CogVLM2Config, layout: ShardLayout) -> np.ndarray:
    """Rows Q | K | V (heads*hd | kv*hd | kv*hd) -> this rank's Q | K | V, same layout."""
    hd, q_rows = config.head_dim, config.num_attention_heads * config.head_dim
    kv_rows = config.num_kv_heads * hd
    q, k, v = array[:q_rows], array[q_rows:q_rows + kv_rows], array[q_rows + kv_rows:]
    return np.concatenate([_rows(q, layout.heads, hd), _rows(k, layout.kv_heads, hd), _rows(v, layout.kv_heads, hd)])


def _vision_qkv(array: np.ndarray, config: CogVLM2Config, layout: ShardLayout) -> np.ndarray:
    """Rows [3, heads, hd] (Q | K | V) -> [3, this rank's heads, hd]."""
    v = config.vision
    per_part = array.reshape(3, v.num_heads, v.head_dim, *array.shape[1:])
    part = per_part[:, layout.vision_heads.start:layout.vision_heads.stop]
    return part.reshape(-1, *array.shape[1:])


def _rank_zero_only(array: np.ndarray, layout: ShardLayout) -> np.ndarray:
    """A bias added after an all-reduce: one rank adds it, the others add zeros."""
    return array if layout.rank == 0 else np.zeros_like(array)


Slicer = Callable[[np.ndarray, CogVLM2Config, ShardLayout], np.ndarray]
_DECODER = r"model\.layers\.\d+\."
_VISION = r"model\.vision\.transformer\.layers\.\d+\."
_DECODER_SLICERS: list[tuple[re.Pattern[str], Slicer]] = [(re.compile(pattern), slicer) for pattern, slicer in [
    (_DECODER + r"self_attn\.(language|vision)_expert_query_key_value\.(weight|bias)", _decoder_qkv),
    (_DECODER + r"self_attn\.(language|vision)_expert_dense\.weight",
     lambda a, c, s: _columns(a, s.heads, c.head_dim)),
    (_DECODER + r"mlp\.(language|vision)_mlp\.(gate_proj|up_proj)\.weight", lambda a, c, s: _rows(a, s.intermediate, 1)),
    (_DECODER + r"mlp\.(language|vision)_mlp\.down_proj\.weight", lambda a, c, s: _columns(a, s.intermediate, 1)),
    (r"model\.embed_tokens\.weight|lm_head\.weight", lambda a, c, s: _rows(a, s.vocab, 1)),
]]
_VISION_SLICERS: list[tuple[re.Pattern[str], Slicer]] = [(re.compile(pattern), slicer) for pattern, slicer in [
    (_VISION + r"attention\.query_key_value\.(weight|bias)", _vision_qkv),
    (_VISION + r"attention\.dense\.weight", lambda a, c, s: _columns(a, s.vision_heads, c.vision.head_dim)),
    (_VISION + r"mlp\.fc1\.(weight|bias)", lambda a, c, s: _rows(a, s.vision_intermediate, 1)),
    (_VISION + r"mlp\.fc2\.weight", lambda a, c, s: _columns(a, s.vision_intermediate, 1)),
    (_VISION + r"(attention\.dense|mlp\.fc2)\.bias", lambda a, c, s: _rank_zero_only(a, s)),
]]


def shard_tensor(name: str, array: np.ndarray, config: CogVLM2Config, layout: ShardLayout) -> np.ndarray:
    """This rank's part of one checkpoint tensor (HF name): a contiguous copy of its slice, or the array itself
    when the tensor is replicated."""
    if isinstance(array, Int8Rows):
        return _shard_int8_rows(name, array, config, layout)
    slicers = _DECODER_SLICERS + (_VISION_SLICERS if not layout.vision_data_parallel else [])
    for pattern, slicer in slicers:
        if pattern.fullmatch(name):
            return np.ascontiguousarray(slicer(array, config, layout))
    return array


def _shard_int8_rows(name: str, weight: Int8Rows, config: CogVLM2Config, layout: ShardLayout) -> Int8Rows:
    """A quantized weight's slice: its scales (one per row) go with the rows, sliced where the rows are
    (column-parallel), whole where the columns are (row-parallel) or the weight is replicated."""
    values = shard_tensor(name, weight.values, config, layout)
    scales = weight.scales
    if values.shape[0] != weight.values.shape[0]:
        scales = np.ascontiguousarray(shard_tensor(name, weight.scales, config, layout))
    return Int8Rows(values, scales)


def shard_shape(name: str, shape: tuple[int, ...], config: CogVLM2Config, layout: ShardLayout) -> tuple[int, ...]:
    """The shape of shard_tensor's result, from the tensor's shape alone (a zero-stride view is sliced)."""
    view = np.broadcast_to(np.zeros((), np.uint8), shape)
    return tuple(shard_tensor(name, view, config, layout).shape)


# ---- the sharded model ------------------------------------------------------------------------------------------
class ParallelLanguageModel(LanguageModel):
    """The decoder over this rank's heads, intermediate slice and vocabulary slice."""
    partial_products = True

    def __init__(self, config: CogVLM2Config, tensors: dict[str, np.ndarray], inv_freq: np.ndarray | None,
                 layout: ShardLayout, kernels: KernelSet):
        self.layout = layout
        self._all_reduce = ops.AllReduce()
        super().__init__(config, tensors, inv_freq, kernels)
        self.num_heads, self.num_kv_heads = layout.heads.size, layout.kv_heads.size

    def reduce(self, x: Tensor) -> Tensor:
        return self._all_reduce(x)

    def embed(self, token_ids: np.ndarray) -> Tensor:
        local = token_ids.astype(np.int64) - self.layout.vocab.start
        inside = (local >= 0) & (local < self.layout.vocab.size)
        rows = self.embed_table[np.where(inside, local, 0)].astype(np.float32)
        rows[~inside] = 0
        return self.reduce(Tensor.from_numpy(rows))


class ParallelCogVLM2Model(CogVLM2Model):
    """One rank's shard. `forward` returns logits for this rank's vocabulary slice only."""

    def __init__(self, config: CogVLM2Config, tensors: dict[str, np.ndarray], inv_freq: np.ndarray | None,
                 layout: ShardLayout, kernels: KernelSet, with_vision: bool = True):
        configure_mindspore()
        self.config, self.layout, self.kernels = config, layout, kernels
        reduce = (lambda x: x) if layout.vision_data_parallel else ops.AllReduce()
        self.vision = VisionEncoder(config, tensors, kernels, reduce) if with_vision else None
        self.language = ParallelLanguageModel(config, tensors, inv_freq, layout, kernels)
        self._all_gather = ops.AllGather()

    def encode_images(self, pixel_values: np.ndarray) -> Tensor:
        if not self.layout.vision_data_parallel:
            return self.vision(pixel_values)  # every rank computes its heads of every image
        return self._encode_share(pixel_values)

    def _encode_share(self, pixel_values: np.ndarray) -> Tensor:
        """Rank r encodes images [r * k, (r + 1) * k) of the step's (padded to k per rank), then all ranks gather
        every rank's features in rank order."""
        count, size, rank = pixel_values.shape[0], self.layout.size, self.layout.rank
        per_rank = -(-count // size)
        padding = np.zeros((per_rank * size - count,) + pixel_values.shape[1:], pixel_values.dtype)
        mine = np.concatenate([pixel_values, padding])[rank * per_rank:(rank + 1) * per_rank]
        return self._all_gather(self.vision(mine))[:count]


def load_shard(source: ModelSource, size: int, rank: int, kernels: KernelSet, mm_encoder_tp_mode: str = "weights",
               progress: bool = False, storage: np.dtype | None = None,
               with_vision: bool = True) -> ParallelCogVLM2Model:
    """Stream the checkpoint and keep only this rank's slices (peak: the shard plus one full tensor).
    Call after mindspore.communication.init()."""
    from cogvlm2.weights import load_weights
    layout = shard_layout(source.config, size, rank, mm_encoder_tp_mode)
    tensors: dict[str, np.ndarray] = {}

    def keep(name: str, array: np.ndarray) -> None:
        if with_vision or not name.startswith(VISION_PREFIX):
            tensors[name] = shard_tensor(name, array, source.config, layout)

    weights = load_weights(source, consume=keep, progress=progress, storage=storage)
    return ParallelCogVLM2Model(source.config, tensors, weights.inv_freq, layout, kernels, with_vision)
