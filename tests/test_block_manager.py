"""Paged KV block manager: allocation, slot mapping, reference counts, prefix caching and eviction."""
import pytest

from engine.block_manager import BlockManager
from engine.sequence import Sequence

BOS, IMAGE = 128000, 128002


def text_seq(request_id: str, token_ids: list[int]) -> Sequence:
    return Sequence(request_id, list(token_ids))


def image_seq(request_id: str, text_ids: list[int], num_image_tokens: int, image_hash: str | None) -> Sequence:
    """[BOS][boi, patches..., eoi][text]: CogVLM2 layout, positions and routing."""
    types = [0] + [1] * num_image_tokens + [0] * len(text_ids)
    positions = [0, 1] + [2] * (num_image_tokens - 2) + [3] + [4 + k for k in range(len(text_ids))]
    mask = [int(types[i] == 1 and i + 1 < len(types) and types[i + 1] == 1) for i in range(len(types))]
    return Sequence(request_id, [BOS] + [IMAGE] * num_image_tokens + list(text_ids), types, positions, mask,
                    image_hash=image_hash)


def compute(bm: BlockManager, seq: Sequence, num_tokens: int) -> None:
    """What the engine does around one step: reserve slots, write KV, advance, publish full blocks."""
    if not seq.block_table:
        assert bm.allocate(seq, num_tokens)
    else:
        assert bm.append_slots(seq, num_tokens)
    seq.num_computed_tokens += num_tokens
    bm.commit_computed(seq)


def run_prompt(bm: BlockManager, seq: Sequence) -> None:
    assert bm.allocate(seq, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.commit_computed(seq)


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_slot_mapping_follows_block_table_with_chunks_starting_mid_block(block_size):
    bm = BlockManager(num_blocks=64, block_size=block_size, enable_prefix_caching=False)
    seqs = [text_seq("a", range(1, 38)), text_seq("b", range(100, 123))]
    for seq in seqs:
        start = 0
        for chunk in (3, 7, 1, 100):  # chunk boundaries fall mid-block for block sizes 4 and 16
            chunk = min(chunk, seq.num_tokens - start)
            if chunk == 0:
                break
            compute(bm, seq, chunk)
            slots = bm.slot_mapping(seq, start, start + chunk)
            expected = [seq.block_table[i // block_size] * block_size + i % block_size
                        for i in range(start, start + chunk)]
            assert slots == expected
            start += chunk
        assert len(seq.block_table) == -(-seq.num_tokens // block_size)
    all_slots = [s for seq in seqs for s in bm.slot_mapping(seq, 0, seq.num_tokens)]
    assert len(set(all_slots)) == len(all_slots)  # no two tokens share a slot
    assert max(all_slots) < 64 * block_size


def test_allocate_fails_without_side_effects_when_pool_is_too_small():
    bm = BlockManager(num_blocks=4, block_size=4)
    big = text_seq("big", range(1, 18))  # 17 tokens -> 5 blocks
    assert not bm.allocate(big, big.num_tokens)
    assert big.block_table == [] and big.num_computed_tokens == 0
    assert bm.num_free_blocks == 4
    assert bm.prefix_cache_queried_tokens == 0
    assert bm.allocate(big, 16)  # a chunk that fits
    assert len(big.block_table) == 4 and bm.num_free_blocks == 0
    big.num_computed_tokens = 16
    assert not bm.can_append(big, 1)
    assert not bm.append_slots(big, 1)
    assert len(big.block_table) == 4
    bm.free(big)
    assert bm.num_free_blocks == bm.num_total_blocks == 4 and big.block_table == []


def test_append_slots_only_adds_missing_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = text_seq("a", range(1, 6))  # 5 tokens
    assert bm.allocate(seq, 3)
    assert len(seq.block_table) == 1
    seq.num_computed_tokens = 3
    assert bm.append_slots(seq, 1) and len(seq.block_table) == 1  # token 3 still in block 0
    assert bm.append_slots(seq, 2) and len(seq.block_table) == 2  # tokens 3, 4
    assert bm.num_free_blocks == 6


def test_identical_image_prompt_hits_and_different_image_misses():
    bm = BlockManager(num_blocks=32, block_size=4)
    first = image_seq("a", [7, 8, 9, 10, 11], num_image_tokens=10, image_hash="img-1")  # 16 tokens
    run_prompt(bm, first)
    assert bm.num_cached_blocks == 4
    first_blocks = list(first.block_table)
    bm.free(first)
    assert bm.num_free_blocks == 32  # cached blocks are free (evictable) but still findable

    same = image_seq("b", [7, 8, 9, 10, 11], num_image_tokens=10, image_hash="img-1")
    assert bm.allocate(same, same.num_tokens - 12)
    # 16 tokens: the block holding the last token is recomputed, so 3 of 4 blocks hit
    assert same.num_cached_prompt_tokens == same.num_computed_tokens == 12
    assert same.block_table[:3] == first_blocks[:3]
    assert same.block_table[3] != first_blocks[3]
    assert bm.prefix_cache_hit_tokens == 12 and bm.prefix_cache_queried_tokens == 32

    other_image = image_seq("c", [7, 8, 9, 10, 11], num_image_tokens=10, image_hash="img-2")
    assert bm.num_cached_tokens(other_image) == 0
    assert bm.allocate(other_image, other_image.num_tokens)
    assert other_image.num_cached_prompt_tokens == 0
    assert not set(other_image.block_table) & set(same.block_table)
    assert bm.prefix_cache_hit_tokens == 12 and bm.prefix_cache_queried_tokens == 48


def test_image_without_hash_is_never_shared():
    bm = BlockManager(num_blocks=32, block_size=4)
    run_prompt(bm, image_seq("a", [5, 6, 7], num_image_tokens=8, image_hash=None))
    assert bm.num_cached_blocks == 0
    assert bm.num_cached_tokens(image_seq("b", [5, 6, 7], num_image_tokens=8, image_hash=None)) == 0


def test_text_prompt_sharing_a_prefix_hits_only_shared_full_blocks():
    bm = BlockManager(num_blocks=32, block_size=4)
    run_prompt(bm, text_seq("a", list(range(1, 11))))  # 10 tokens: blocks [1-4], [5-8] full
    sharing = text_seq("b", list(range(1, 7)) + [99, 98, 97, 96, 95])  # shares tokens 1..6
    assert bm.num_cached_tokens(sharing) == 4
    longer = text_seq("c", list(range(1, 11)) + [50, 51])
    assert bm.num_cached_tokens(longer) == 8


def test_whole_sequence_cached_still_computes_the_last_token():
    bm = BlockManager(num_blocks=32, block_size=4)
    run_prompt(bm, text_seq("a", range(1, 13)))  # exactly 3 full blocks
    exact = text_seq("b", range(1, 13))
    assert bm.allocate(exact, exact.num_tokens - 8)
    assert exact.num_computed_tokens == 8  # the last block is not reused: it holds the token to compute
    assert bm.ref_count(exact.block_table[2]) == 1
    bm.free(exact)
    one_more = text_seq("c", list(range(1, 13)) + [77])
    assert bm.num_cached_tokens(one_more) == 12


def test_prefix_caching_disabled_never_hits():
    bm = BlockManager(num_blocks=32, block_size=4, enable_prefix_caching=False)
    run_prompt(bm, text_seq("a", range(1, 13)))
    assert bm.num_cached_blocks == 0
    seq = text_seq("b", range(1, 13))
    assert bm.allocate(seq, seq.num_tokens)
    assert seq.num_cached_prompt_tokens == 0 and bm.prefix_cache_queried_tokens == 0


def test_shared_prefix_blocks_are_reference_counted():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = text_seq("a", range(1, 11))  # 10 tokens, 3 blocks, 2 full
    run_prompt(bm, a)
    b = text_seq("b", list(range(1, 9)) + [42])
    assert bm.allocate(b, 1)
    shared = b.block_table[:2]
    assert shared == a.block_table[:2]
    assert [bm.ref_count(block) for block in shared] == [2, 2]
    assert bm.num_free_blocks == 8 - 3 - 1

    bm.free(a)
    assert [bm.ref_count(block) for block in shared] == [1, 1]
    assert bm.num_free_blocks == 8 - 3  # a's private tail block is free, the shared ones are not
    filler = text_seq("filler", range(500, 520))  # takes every free block
    assert bm.allocate(filler, filler.num_tokens)
    assert not set(filler.block_table) & set(b.block_table)
    assert bm.num_free_blocks == 0
    bm.free(b)
    bm.free(filler)
    assert bm.num_free_blocks == bm.num_total_blocks


def test_evictable_blocks_are_reused_tail_first():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = text_seq("a", range(1, 17))  # 16 tokens: 4 full blocks, all cached
    run_prompt(bm, a)
    a_blocks = list(a.block_table)
    bm.free(a)
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 4

    other = text_seq("x", range(100, 104))  # needs one block: a's tail is evicted first
    assert bm.allocate(other, other.num_tokens)
    assert other.block_table == [a_blocks[3]]
    assert bm.num_cached_blocks == 3
    assert bm.num_cached_tokens(text_seq("a2", list(range(1, 17)) + [0])) == 12  # prefix blocks survive

    bigger = text_seq("y", range(200, 212))  # needs the other three: every cached block is evicted
    assert bm.allocate(bigger, bigger.num_tokens)
    assert bm.num_cached_blocks == 0 and bm.num_free_blocks == 0
    assert bm.num_cached_tokens(text_seq("a3", list(range(1, 17)) + [0])) == 0


def test_cache_hit_on_free_blocks_is_counted_against_the_pool():
    bm = BlockManager(num_blocks=4, block_size=4)
    first = text_seq("a", range(1, 9))
    run_prompt(bm, first)  # 2 cached blocks
    bm.free(first)
    assert bm.num_free_blocks == 4
    longer = text_seq("b", list(range(1, 9)) + list(range(50, 60)))  # 18 tokens: 2 hits + 3 new blocks > 4
    assert not bm.allocate(longer, longer.num_tokens - 8)
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 2  # nothing taken, nothing evicted
    assert bm.allocate(longer, 8)  # 2 hits + 2 new blocks
    assert longer.num_computed_tokens == 8 and len(longer.block_table) == 4


def test_duplicate_content_computed_twice_keeps_one_cache_entry_and_leaks_nothing():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = text_seq("a", range(1, 10)), text_seq("b", range(1, 10))
    assert bm.allocate(a, a.num_tokens) and bm.allocate(b, b.num_tokens)  # in flight together: no hits
    for seq in (a, b):
        seq.num_computed_tokens = seq.num_tokens
        bm.commit_computed(seq)
    assert bm.num_cached_blocks == 2
    assert bm.num_cached_tokens(text_seq("c", range(1, 10))) == 8
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8
    assert bm.num_cached_tokens(text_seq("d", range(1, 10))) == 8


def test_generated_tokens_are_cached_after_commit():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = text_seq("a", range(1, 4))  # 3 prompt tokens
    compute(bm, seq, 3)
    assert bm.num_cached_blocks == 0
    seq.output_token_ids.append(60)
    compute(bm, seq, 1)  # block 0 now full with a generated token
    assert bm.num_cached_blocks == 1
    bm.free(seq)
    resumed = text_seq("a", range(1, 4))
    resumed.output_token_ids = [60, 61]
    assert bm.num_cached_tokens(resumed) == 4
