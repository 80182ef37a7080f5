"""What the driver sends the model each step: the flat batch as host arrays (StepInputs) and the image plan (which
images to encode, which to evict). The same `StepRequest` goes to the in-process runner and to every msrun worker
(engine/executor.py, engine/distributed.py), so the driver alone decides what the encoder caches hold."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from engine.block_manager import slot_indices
from engine.scheduler import ScheduledChunk


@dataclass
class ImageSlice:
    """Feature rows [start, stop) of the image `image_hash` fill batch positions from `batch_start` on."""
    image_hash: str
    start: int
    stop: int
    batch_start: int


@dataclass
class PromptLogitsRows:
    """Logits rows [row, row + count) of a step belong to chunk `chunk_index`: row j predicts prompt token
    `first_token + j` (from the position before it), for prompt_logprobs."""
    chunk_index: int
    row: int
    first_token: int
    count: int


@dataclass
class StepInputs:
    """One step's flat batch in batch order. Per token: its sequence's index in the batch (`seq_index`), its
    index within that sequence (`token_position`) and its KV slot; per sequence: block table and context length."""
    token_ids: np.ndarray
    position_ids: np.ndarray
    vision_expert: np.ndarray
    logits_positions: np.ndarray
    seq_index: np.ndarray
    token_position: np.ndarray
    slot_mapping: np.ndarray
    block_tables: list[list[int]]
    context_lens: list[int]
    images: list[ImageSlice]
    sample_rows: np.ndarray  # rows of the logits to sample from, one per chunk that needs a sample
    prompt_rows: list[PromptLogitsRows]  # rows that give prompt logprobs


@dataclass
class StepRequest:
    inputs: StepInputs
    new_images: dict[str, np.ndarray]  # pixel values by image hash: encode before the forward
    evicted_images: list[str]           # image hashes to drop after it


def step_inputs(chunks: list[ScheduledChunk], block_size: int) -> StepInputs:
    token_ids, positions, experts, seq_index, token_position, slots = [], [], [], [], [], []
    images, logits_positions, sample_rows, prompt_rows = [], [], [], []
    offset = 0
    for s, chunk in enumerate(chunks):
        seq, start, end = chunk.seq, chunk.start, chunk.end
        token_ids.append(seq.token_ids_slice(start, end))
        positions.append(seq.position_ids_slice(start, end))
        experts.append(seq.vision_expert_mask_slice(start, end))
        seq_index.append(np.full(end - start, s))
        token_position.append(np.arange(start, end))
        slots.append(slot_indices(seq.block_table, start, end, block_size))
        image = image_slice(chunk, offset)
        if image is not None:
            images.append(image)
        predicting = prompt_predicting_positions(chunk)
        if predicting:
            prompt_rows.append(PromptLogitsRows(s, len(logits_positions), predicting.start + 1, len(predicting)))
            logits_positions.extend(range(offset + predicting.start - start, offset + predicting.stop - start))
        offset += end - start
        if chunk.needs_sample:
            sample_rows.append(len(logits_positions))
            logits_positions.append(offset - 1)
    return StepInputs(
        token_ids=np.concatenate(token_ids), position_ids=np.concatenate(positions),
        vision_expert=np.concatenate(experts).astype(bool), logits_positions=np.asarray(logits_positions, np.int64),
        seq_index=np.concatenate(seq_index), token_position=np.concatenate(token_position),
        slot_mapping=np.concatenate(slots), block_tables=[c.seq.block_table for c in chunks],
        context_lens=[c.end for c in chunks], images=images, sample_rows=np.asarray(sample_rows, np.int64),
        prompt_rows=prompt_rows)


def prompt_predicting_positions(chunk: ScheduledChunk) -> range:
    """The chunk's token indices whose logits predict the next prompt token, when its request asked for
    prompt_logprobs (the last prompt token predicts the first output: that is the sample, not a prompt logprob)."""
    params = chunk.seq.sampling_params
    if params is None or params.prompt_logprobs is None:
        return range(0)
    return range(chunk.start, max(min(chunk.end, chunk.seq.num_prompt_tokens - 1), chunk.start))


def starts_image_lookup(chunk: ScheduledChunk, image: ImageSlice) -> bool:
    """The chunk holds the first image rows its prefill computes: those after the prompt's prefix-cached tokens."""
    return image.start == max(chunk.seq.num_cached_prompt_tokens - chunk.seq.image_span[0], 0)


def image_slice(chunk: ScheduledChunk, offset: int) -> ImageSlice | None:
    """The chunk's image rows (if its tokens overlap the image span), placed from batch position `offset`."""
    span = chunk.seq.image_span
    if span is None:
        return None
    lo, hi = max(span[0], chunk.start), min(span[1], chunk.end)
    if lo >= hi:
        return None
    return ImageSlice(chunk.seq.image_hash, lo - span[0], hi - span[0], lo - chunk.start + offset)


class ImagePlanner:
    """The one image LRU: which images' vision features the model side holds. Each step encodes the images its
    chunks need that are not held yet, and evicts the least recently used beyond `capacity` after the step."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.held: OrderedDict[str, None] = OrderedDict()
        # Lookups, one per image per prefill (its later chunks continue it), and the lookups that found the
        # features held or already being encoded this step: the misses are the encodes.
        self.num_queries = 0
        self.num_hits = 0

    def plan(self, chunks: list[ScheduledChunk]) -> tuple[dict[str, np.ndarray], list[str]]:
        """(pixel values of the images to encode this step, image hashes to evict after it)."""
        new: dict[str, np.ndarray] = {}
        for chunk in chunks:
            image_hash = chunk.seq.image_hash
            image = image_slice(chunk, 0)
            if not image_hash or image is None:
                continue
            if starts_image_lookup(chunk, image):
                self.num_queries += 1
                self.num_hits += image_hash in self.held or image_hash in new
            if image_hash in self.held:
                self.held.move_to_end(image_hash)
            elif image_hash not in new:
                new[image_hash] = chunk.seq.pixel_values
        self.held.update(dict.fromkeys(new))
        evicted = []
        while len(self.held) > self.capacity:
            evicted.append(self.held.popitem(last=False)[0])
        return new, evicted

    def request(self, chunks: list[ScheduledChunk], block_size: int) -> StepRequest:
        new_images, evicted = self.plan(chunks)
        return StepRequest(step_inputs(chunks, block_size), new_images, evicted)
