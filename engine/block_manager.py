"""Paged KV cache allocation: a fixed pool of blocks, reference counts and a prefix cache of full blocks.

A block is cached under the hash of its content chained with the previous block's hash, so a hit on block i
implies the whole prefix up to block i matches. Freed cached blocks stay findable until their id is handed out
again (least recently freed first).
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None  # set while the block is registered in the prefix cache


def hash_block(prev_hash: bytes, seq: Sequence, block_index: int, block_size: int) -> bytes:
    """What determines a block's KV: the prefix (chained), its token ids, positions, expert routing and,
    mixed into block 0 and carried by the chain, the image content."""
    start, end = block_index * block_size, (block_index + 1) * block_size
    h = hashlib.sha256(prev_hash)
    if block_index == 0:
        h.update(b"image:" + (seq.image_hash or "").encode() + b";")
    for values in (seq.token_ids_slice(start, end), seq.position_ids_slice(start, end),
                   seq.vision_expert_mask_slice(start, end)):
        h.update(array("q", values).tobytes())
    return h.digest()


def slot_indices(block_table: list[int], start: int, end: int, block_size: int) -> np.ndarray:
    """KV-cache slots of a sequence's tokens [start, end): block_table[i // block_size] * block_size + i % bs."""
    index = np.arange(start, end)
    return np.asarray(block_table, np.int64)[index // block_size] * block_size + index % block_size


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be positive")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Blocks with ref count 0, least recently freed first: the eviction order of cached ones.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[bytes, int] = {}
        self._num_committed_blocks: dict[str, int] = {}  # request_id -> leading blocks already registered
        self.prefix_cache_queried_tokens = 0
        self.prefix_cache_hit_tokens = 0
        self.shared_prompt_tokens = 0  # prompt tokens that copies of a request (n > 1) took from their source

    # ---- pool state
    @property
    def num_total_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref count 0, including evictable cached ones."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_total_blocks

    def ref_count(self, block_id: int) -> int:
        return self.blocks[block_id].ref_count

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache lookup
    def _is_cacheable(self, seq: Sequence) -> bool:
        # Without a content hash, image KV cannot be told apart from another image's: never share it.
        has_image = seq.image_span is not None
        return self.enable_prefix_caching and (seq.image_hash is not None or not has_image)

    def _block_hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        hashes = seq.block_hashes
        while len(hashes) < num_blocks:
            prev = hashes[-1] if hashes else b""
            hashes.append(hash_block(prev, seq, len(hashes), self.block_size))
        return hashes[:num_blocks]

    def _cache_hits(self, seq: Sequence) -> list[int]:
        """Block ids of the longest cached prefix, leaving at least the last token to compute (its logits give
        the next token) and never reusing the block that holds it (that block will be written)."""
        if not self._is_cacheable(seq) or not seq.reads_prefix_cache:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hits = []
        for block_hash in self._block_hashes(seq, max_blocks):
            block_id = self._cached.get(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def num_cached_tokens(self, seq: Sequence) -> int:
        """Tokens of a waiting sequence that `allocate` would not compute: its shared prompt blocks, else its
        prefix-cache hits (no side effects)."""
        if seq.block_table:
            return seq.num_computed_tokens
        return len(self._cache_hits(seq)) * self.block_size

    # ---- allocation
    def share_prompt(self, source: Sequence, copy: Sequence) -> None:
        """Gives a waiting copy of `source`'s request (same prompt, no KV yet) the source's full, computed prompt
        blocks: that KV is computed once and read by both. The copy computes the rest of its prompt itself."""
        assert not copy.block_table and copy.num_computed_tokens == 0, "share_prompt() is for sequences without KV"
        num_blocks = min((copy.num_prompt_tokens - 1) // self.block_size, source.num_computed_tokens // self.block_size)
        copy.block_table = source.block_table[:num_blocks]
        for block_id in copy.block_table:
            self._take_ref(block_id)
        copy.num_computed_tokens = copy.num_cached_prompt_tokens = num_blocks * self.block_size
        self._num_committed_blocks[copy.request_id] = num_blocks
        self.shared_prompt_tokens += num_blocks * self.block_size

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """First allocation of a waiting sequence: reuse its shared prompt blocks (share_prompt) or else its cached
        prefix, then reserve blocks for `num_new_tokens` more tokens. Returns False, changing nothing, if the pool
        cannot hold them."""
        num_shared = len(seq.block_table)  # held already
        assert seq.num_computed_tokens == num_shared * self.block_size, "allocate() is for sequences without KV"
        hits = [] if num_shared else self._cache_hits(seq)
        num_reused_tokens = (num_shared + len(hits)) * self.block_size
        num_new_blocks = self.num_blocks_for(num_reused_tokens + num_new_tokens) - num_shared - len(hits)
        hits_now_free = sum(1 for block_id in hits if self.blocks[block_id].ref_count == 0)
        if num_new_blocks > self.num_free_blocks - hits_now_free:
            return False
        for block_id in hits:
            self._take_ref(block_id)
        seq.block_table = seq.block_table + hits + [self._allocate_block() for _ in range(num_new_blocks)]
        seq.num_computed_tokens = seq.num_cached_prompt_tokens = num_reused_tokens
        self._num_committed_blocks[seq.request_id] = num_shared + len(hits)
        if self._is_cacheable(seq) and not num_shared:
            self.prefix_cache_queried_tokens += seq.num_tokens
            self.prefix_cache_hit_tokens += len(hits) * self.block_size
        return True

    def _num_missing_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        needed = self.num_blocks_for(seq.num_computed_tokens + num_new_tokens)
        return max(needed - len(seq.block_table), 0)

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self._num_missing_blocks(seq, num_new_tokens) <= self.num_free_blocks

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow the block table to cover num_computed_tokens + num_new_tokens. False (no change) if full."""
        num_missing = self._num_missing_blocks(seq, num_new_tokens)
        if num_missing > self.num_free_blocks:
            return False
        seq.block_table.extend(self._allocate_block() for _ in range(num_missing))
        return True

    def commit_computed(self, seq: Sequence) -> None:
        """Register the blocks that became full and computed (their KV is written) in the prefix cache."""
        if not self._is_cacheable(seq):
            return
        first = self._num_committed_blocks.get(seq.request_id, 0)
        num_full = seq.num_computed_tokens // self.block_size
        hashes = self._block_hashes(seq, num_full)
        for block_index in range(first, num_full):
            block = self.blocks[seq.block_table[block_index]]
            # The same content computed twice (two identical prompts in flight): keep the first copy.
            if hashes[block_index] not in self._cached:
                self._cached[hashes[block_index]] = block.block_id
                block.block_hash = hashes[block_index]
        self._num_committed_blocks[seq.request_id] = num_full

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references; the tail goes first so it is evicted before the shared prefix."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
        seq.block_table = []
        self._num_committed_blocks.pop(seq.request_id, None)

    def slot_mapping(self, seq: Sequence, start: int, end: int) -> list[int]:
        return slot_indices(seq.block_table, start, end, self.block_size).tolist()

    # ---- internals
    def _take_ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _allocate_block(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:  # evict: its KV is about to be overwritten
            del self._cached[block.block_hash]
            block.block_hash = None
        block.ref_count = 1
        return block_id
