"""Scheduler output -> one flat varlen batch -> the model over the paged KV cache -> logits of sampled rows."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from mindspore import Parameter, Tensor, ops

from cogvlm2.model import CogVLM2Model, TokenBatch
from engine.block_manager import slot_indices
from engine.scheduler import ScheduledChunk, SchedulerOutput
from engine.timing import PhaseTimer
from kernels.registry import KernelSet, pad_block_tables


@dataclass
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    num_blocks: int

    @property
    def bytes_per_block(self) -> int:
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * 4


def kv_cache_spec(model: CogVLM2Model, block_size: int, num_blocks: int) -> KVCacheSpec:
    c = model.config
    return KVCacheSpec(c.num_hidden_layers, model.language.num_kv_heads, c.head_dim, block_size, num_blocks)


class PagedKVCache:
    """Per layer, K and V of `num_blocks * block_size` slots, allocated once."""

    def __init__(self, spec: KVCacheSpec):
        self.spec = spec
        shape = (spec.num_blocks * spec.block_size, spec.num_kv_heads, spec.head_dim)
        self.keys = [Parameter(Tensor(np.zeros(shape, np.float32)), name=f"k_cache_{i}", requires_grad=False)
                     for i in range(spec.num_layers)]
        self.values = [Parameter(Tensor(np.zeros(shape, np.float32)), name=f"v_cache_{i}", requires_grad=False)
                       for i in range(spec.num_layers)]


class PagedAttention:
    """The model's attention over the paged cache for one forward (built per step): the kernel set's fused
    RoPE + cache write + paged attention, fed per-token metadata so that any token order works."""
    fuses_rope = True

    def __init__(self, cache: PagedKVCache, kernels: KernelSet, token_seq_index: np.ndarray,
                 token_position: np.ndarray, slot_mapping: np.ndarray, block_tables: list[list[int]],
                 context_lens: list[int]):
        self.cache, self.kernels = cache, kernels
        self.token_seq_index, self.token_position, self.slot_mapping = token_seq_index, token_position, slot_mapping
        self.block_tables, self.context_lens = block_tables, context_lens
        self.inputs: tuple[Tensor, ...] | None = None
        self.rope: tuple[Tensor, Tensor, Tensor] | None = None  # set by the model before the layers run

    def prepare(self, order: np.ndarray) -> None:
        if self.inputs is not None:
            return
        self.inputs = (_int32(self.slot_mapping[order]), _int32(self.token_seq_index[order]),
                       _int32(self.token_position[order]), _int32(pad_block_tables(self.block_tables)),
                       _int32(self.context_lens))

    def __call__(self, layer: int, q: Tensor, k: Tensor | None, v: Tensor | None) -> Tensor:
        return self.kernels.paged_attention(q, k, v, self.cache.keys[layer], self.cache.values[layer], *self.inputs,
                                            self.cache.spec.block_size, rope=self.rope)

    def attend_qkv(self, layer: int, qkv: Tensor) -> Tensor:
        """The layer's fused QKV projection [N, H + 2 KV, d], split inside the kernel."""
        return self(layer, qkv, None, None)


def _int32(values) -> Tensor:
    return Tensor.from_numpy(np.ascontiguousarray(values, np.int32))


class EncoderCache:
    """Vision features by image content hash, so an image is encoded once however many chunks or requests use it."""

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self.entries: OrderedDict[str, Tensor] = OrderedDict()

    def get(self, image_hash: str) -> Tensor | None:
        features = self.entries.get(image_hash)
        if features is not None:
            self.entries.move_to_end(image_hash)
        return features

    def put(self, image_hash: str, features: Tensor) -> None:
        self.entries[image_hash] = features
        self.entries.move_to_end(image_hash)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)


@dataclass
class ImageSlice:
    """Feature rows [start, stop) of the image `image_hash` fill batch positions from `batch_start` on."""
    image_hash: str
    start: int
    stop: int
    batch_start: int


@dataclass
class StepInputs:
    """One step's flat batch as host arrays, in batch order; image features are found by hash in the encoder
    cache. Tensor-parallel workers receive exactly this (engine/distributed.py)."""
    token_ids: np.ndarray
    position_ids: np.ndarray
    vision_expert: np.ndarray
    logits_positions: np.ndarray
    seq_index: np.ndarray
    token_index: np.ndarray
    slot_mapping: np.ndarray
    block_tables: list[list[int]]
    context_lens: list[int]
    images: list[ImageSlice]


def step_inputs(chunks: list[ScheduledChunk], block_size: int) -> StepInputs:
    token_ids, positions, experts, seq_index, token_index, slots = [], [], [], [], [], []
    images, logits_positions = [], []
    offset = 0
    for s, chunk in enumerate(chunks):
        seq, start, end = chunk.seq, chunk.start, chunk.end
        token_ids.append(seq.token_ids_slice(start, end))
        positions.append(seq.position_ids_slice(start, end))
        experts.append(seq.vision_expert_mask_slice(start, end))
        seq_index.append(np.full(end - start, s))
        token_index.append(np.arange(start, end))
        slots.append(slot_indices(seq.block_table, start, end, block_size))
        image = image_slice(chunk, offset)
        if image is not None:
            images.append(image)
        offset += end - start
        if chunk.needs_sample:
            logits_positions.append(offset - 1)
    return StepInputs(
        token_ids=np.concatenate(token_ids), position_ids=np.concatenate(positions),
        vision_expert=np.concatenate(experts).astype(bool), logits_positions=np.asarray(logits_positions, np.int64),
        seq_index=np.concatenate(seq_index), token_index=np.concatenate(token_index),
        slot_mapping=np.concatenate(slots), block_tables=[c.seq.block_table for c in chunks],
        context_lens=[c.end for c in chunks], images=images)


def image_slice(chunk: ScheduledChunk, offset: int) -> ImageSlice | None:
    """The chunk's image rows (if its tokens overlap the image span), placed from batch position `offset`."""
    span = chunk.seq.image_token_range()
    if span is None:
        return None
    lo, hi = max(span[0], chunk.start), min(span[1], chunk.end)
    if lo >= hi:
        return None
    return ImageSlice(chunk.seq.image_hash, lo - span[0], hi - span[0], lo - chunk.start + offset)


class ModelRunner:
    def __init__(self, model: CogVLM2Model, block_size: int, num_blocks: int, timer: PhaseTimer | None = None):
        self.model = model
        self.timer = timer or PhaseTimer()
        self.block_size = block_size
        self.kv_cache = PagedKVCache(kv_cache_spec(model, block_size, num_blocks))
        self.encoder_cache = EncoderCache()
        self.num_images_encoded = 0

    def execute(self, output: SchedulerOutput) -> np.ndarray:
        """Runs every scheduled chunk; returns logits [num chunks that need a sample, vocab] in chunk order."""
        chunks = output.chunks
        with self.timer.phase("vision"):
            self._encode_missing_images(chunks)
        with self.timer.phase("prepare_inputs"):
            batch, attention = self._build_batch(step_inputs(chunks, self.block_size))
            attention.prepare(batch.routing[0])
        with self.timer.phase("decoder"):
            return self._run(batch, attention)

    def execute_inputs(self, inputs: StepInputs) -> np.ndarray:
        """`execute` for prepared inputs whose images are already in the encoder cache (tensor-parallel workers)."""
        batch, attention = self._build_batch(inputs)
        attention.prepare(batch.routing[0])
        return self._run(batch, attention)

    def _run(self, batch: TokenBatch, attention: PagedAttention) -> np.ndarray:
        if len(batch.logits_positions) == 0:  # only partial prefill chunks: fill the cache, sample nothing
            self.model.hidden_states(batch, attention)
            return np.zeros((0, self.model.config.vocab_size), np.float32)
        return self.model.forward(batch, attention).asnumpy()

    def shutdown(self) -> None:
        """Nothing to release: the model lives in this process."""

    def _encode_missing_images(self, chunks: list[ScheduledChunk]) -> None:
        pending: dict[str, np.ndarray] = {}
        for chunk in chunks:
            seq = chunk.seq
            if seq.image_hash and image_slice(chunk, 0) is not None and self.encoder_cache.get(seq.image_hash) is None:
                pending[seq.image_hash] = seq.pixel_values
        self.encode_images(pending)

    def encode_images(self, pending: dict[str, np.ndarray]) -> None:
        """Pixel values by image hash -> vision features in the encoder cache."""
        if not pending:
            return
        features = self.model.encode_images(np.stack(list(pending.values())))
        for i, image_hash in enumerate(pending):
            self.encoder_cache.put(image_hash, features[i])
        self.num_images_encoded += len(pending)

    def _build_batch(self, inputs: StepInputs) -> tuple[TokenBatch, PagedAttention]:
        rows = [self.encoder_cache.get(image.image_hash)[image.start:image.stop] for image in inputs.images]
        positions = [np.arange(image.batch_start, image.batch_start + image.stop - image.start)
                     for image in inputs.images]
        batch = TokenBatch(
            token_ids=inputs.token_ids, position_ids=inputs.position_ids, vision_expert=inputs.vision_expert,
            logits_positions=inputs.logits_positions,
            image_features=ops.concat(rows, 0) if rows else None,
            image_positions=np.concatenate(positions) if positions else None)
        attention = PagedAttention(self.kv_cache, self.model.kernels, inputs.seq_index,
                                   inputs.token_index, inputs.slot_mapping, inputs.block_tables, inputs.context_lens)
        return batch, attention
