"""The model side of a step, in one process or on one tensor-parallel rank: a StepRequest -> the model over the
paged KV cache -> logits of the sampled rows. The runner owns the model, its kernel set, the compiled graphs, the
KV cache and the encoder cache; the driver (LLMEngine) owns everything else."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from mindspore import Parameter, Tensor, ops

from cogvlm2.config import CogVLM2Config
from cogvlm2.language_model import RopeInputs
from cogvlm2.model import CogVLM2Model, TokenBatch
from cogvlm2.model_source import ModelSource
from cogvlm2.parallel import kv_heads_per_rank, load_shard
from cogvlm2.precision import KV_NUMPY_DTYPES, NUMPY_DTYPES, Precision
from cogvlm2.runtime import configure_mindspore
from engine.batch import StepInputs, StepRequest
from engine.timing import PhaseTimer
from kernels.device import Device
from kernels.interface import KernelSet
from kernels.reference import cache_head_elements
from kernels.registry import get_kernels, pad_block_tables

DEFAULT_KV_CACHE_GB = 1.0


@dataclass
class KVCacheSpec:
    """One device's KV cache: per layer, K and V of num_blocks * block_size slots of its KV heads."""
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    num_blocks: int
    dtype: str = "float32"

    @classmethod
    def for_model(cls, config: CogVLM2Config, tensor_parallel_size: int, block_size: int, num_blocks: int = 0,
                  precision: Precision | None = None) -> "KVCacheSpec":
        """Each tensor-parallel rank caches only its KV heads, in the precision's KV dtype."""
        return cls(config.num_hidden_layers, kv_heads_per_rank(config, tensor_parallel_size), config.head_dim,
                   block_size, num_blocks, precision.kv_cache if precision is not None else "float32")

    @property
    def bytes_per_block(self) -> int:
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_bytes

    @property
    def head_bytes(self) -> int:
        """One token's cache row of one KV head (an int8 row carries its scale)."""
        return cache_head_elements(self.head_dim, self.dtype) * KV_NUMPY_DTYPES[self.dtype].itemsize

    def blocks_for_budget(self, budget_gb: float | None, max_num_seqs: int, max_model_len: int) -> int:
        """Blocks that fit the per-device budget, but never more than every sequence at full length needs."""
        budget_gb = budget_gb or DEFAULT_KV_CACHE_GB
        by_budget = int(budget_gb * 2 ** 30) // self.bytes_per_block
        if by_budget < 1:
            raise ValueError(f"kv_cache_memory_gb {budget_gb} is too small for one KV block "
                             f"({self.bytes_per_block} bytes)")
        return min(by_budget, max_num_seqs * -(-max_model_len // self.block_size))


class PagedKVCache:
    """Per layer, K and V of `num_blocks * block_size` slots, allocated once in the layout the kernels read."""

    def __init__(self, spec: KVCacheSpec, kernels: KernelSet):
        self.spec = spec
        shape = kernels.kv_cache_shape(spec.num_blocks, spec.block_size, spec.num_kv_heads,
                                       cache_head_elements(spec.head_dim, spec.dtype))
        dtype = KV_NUMPY_DTYPES[spec.dtype]
        new = lambda name: kernels.place_kv_cache(  # noqa: E731
            Parameter(Tensor.from_numpy(np.zeros(shape, dtype)), name=name, requires_grad=False))
        self.keys = [new(f"k_cache_{i}") for i in range(spec.num_layers)]
        self.values = [new(f"v_cache_{i}") for i in range(spec.num_layers)]


class PagedAttention:
    """The model's attention over the paged cache for one forward: the kernel set's fused RoPE + cache write +
    paged attention, fed per-token metadata (already in routed order) so that any token order works."""

    def __init__(self, cache: PagedKVCache, kernels: KernelSet, metadata: tuple[Tensor, ...]):
        self.cache, self.kernels, self.metadata = cache, kernels, metadata

    def __call__(self, layer: int, qkv: Tensor, rope: RopeInputs) -> Tensor:
        return self.kernels.paged_attention(qkv, None, None, self.cache.keys[layer], self.cache.values[layer],
                                            *self.metadata, self.cache.spec.block_size,
                                            rope=(rope.positions, rope.cos_table, rope.sin_table))


def _int32(values) -> Tensor:
    return Tensor.from_numpy(np.ascontiguousarray(values, np.int32))


@dataclass
class RunnerConfig:
    """What a runner is built from: the same in this process and, pickled, on every msrun worker."""
    source: ModelSource
    block_size: int
    num_blocks: int
    kernels: str = "auto"
    tensor_parallel_size: int = 1
    rank: int = 0
    mm_encoder_tp_mode: str = "weights"
    precision: Precision = Precision("float32", NUMPY_DTYPES["float32"], "float32")
    quantization: str | None = None
    with_vision: bool = True  # False: text-only serving (limit_mm_per_prompt image=0), no vision tower loaded
    device: str = "auto"      # kernels.device.DEVICES


@dataclass
class RunnerInfo:
    """What the driver reports about the model side (stats, tests)."""
    kernels: str
    kv_cache_shape: tuple[int, ...]  # one layer's K (or V) cache: [slots, KV heads held here, head_dim] on CPU
    device: str = "CPU"              # where the model runs (kernels.device.Device.describe)


class ModelRunner:
    def __init__(self, config: RunnerConfig, timer: PhaseTimer | None = None):
        self.config = config
        self.timer = timer or PhaseTimer()
        self.device = configure_mindspore(config.device)
        self.model = _load_model(config, self.device)
        self.kv_cache = PagedKVCache(KVCacheSpec.for_model(config.source.config, config.tensor_parallel_size,
                                                           config.block_size, config.num_blocks, config.precision),
                                     self.model.kernels)
        self.encoder_cache: dict[str, Tensor] = {}  # vision features by image hash, as the driver's plan says

    @property
    def info(self) -> RunnerInfo:
        return RunnerInfo(self.model.kernels.backend, tuple(self.kv_cache.keys[0].shape), self.device.describe())

    def run_step(self, step: StepRequest) -> np.ndarray:
        """Logits [the rows StepInputs.logits_positions asks for, vocab (this rank's slice)] in batch order."""
        with self.timer.phase("vision"):
            self._encode(step.new_images)
        with self.timer.phase("prepare_inputs"):
            batch, attention = self._build(step.inputs)
        with self.timer.phase("decoder"):
            logits = self._forward(batch, attention)
        for image_hash in step.evicted_images:
            self.encoder_cache.pop(image_hash, None)
        return logits

    def _encode(self, new_images: dict[str, np.ndarray]) -> None:
        if not new_images:
            return
        features = self.model.encode_images(np.stack(list(new_images.values())))
        for i, image_hash in enumerate(new_images):
            self.encoder_cache[image_hash] = features[i]

    def _build(self, inputs: StepInputs) -> tuple[TokenBatch, PagedAttention]:
        rows = [self.encoder_cache[image.image_hash][image.start:image.stop] for image in inputs.images]
        positions = [np.arange(image.batch_start, image.batch_start + image.stop - image.start)
                     for image in inputs.images]
        batch = TokenBatch(
            token_ids=inputs.token_ids, position_ids=inputs.position_ids, vision_expert=inputs.vision_expert,
            logits_positions=inputs.logits_positions, image_features=ops.concat(rows, 0) if rows else None,
            image_positions=np.concatenate(positions) if positions else None)
        order = batch.order
        metadata = (_int32(inputs.slot_mapping[order]), _int32(inputs.seq_index[order]),
                    _int32(inputs.token_position[order]), _int32(pad_block_tables(inputs.block_tables)),
                    _int32(inputs.context_lens))
        return batch, PagedAttention(self.kv_cache, self.model.kernels, metadata)

    def _forward(self, batch: TokenBatch, attention: PagedAttention) -> np.ndarray:
        if len(batch.logits_positions) == 0:  # only partial prefill chunks: fill the cache, sample nothing
            self.model.hidden_states(batch, attention)
            return np.zeros((0, self.model.language.embed_table.shape[0]), np.float32)  # this rank's vocab
        return self.model.forward(batch, attention).asnumpy()


def _load_model(config: RunnerConfig, device: Device) -> CogVLM2Model:
    compute = config.precision.compute
    kernels = get_kernels(config.kernels, compute_dtype=compute, quantization=config.quantization, device=device)
    storage = None if compute == "float32" else NUMPY_DTYPES[compute]  # float32 math keeps 16-bit weights as stored
    if config.tensor_parallel_size == 1:
        return CogVLM2Model.from_source(config.source, kernels, storage, config.with_vision)
    return load_shard(config.source, config.tensor_parallel_size, config.rank, kernels, config.mm_encoder_tp_mode,
                      storage=storage, with_vision=config.with_vision)

