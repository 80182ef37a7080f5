"""Sequence metadata and the continuous-batching scheduler, driven by a fake model that checks the paged KV."""
from types import SimpleNamespace

import pytest

from engine.block_manager import BlockManager
from engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from engine.sequence import Sequence, SequenceStatus

BOS, IMAGE = 128000, 128002


def make_seq(request_id: str, text_ids, num_image_tokens: int = 0, image_hash: str | None = None,
             max_tokens: int = 8, arrival_time: float | None = None) -> Sequence:
    """A prompt in CogVLM2 layout: [BOS][boi, patches..., eoi][text] with its positions and routing."""
    text_ids = list(text_ids)
    if num_image_tokens:
        types = [0] + [1] * num_image_tokens + [0] * len(text_ids)
        positions = [0, 1] + [2] * (num_image_tokens - 2) + [3] + [4 + k for k in range(len(text_ids))]
        ids = [BOS] + [IMAGE] * num_image_tokens + text_ids
    else:
        types, positions, ids = [0] * (1 + len(text_ids)), list(range(1 + len(text_ids))), [BOS] + text_ids
    mask = [int(types[i] == 1 and i + 1 < len(types) and types[i + 1] == 1) for i in range(len(types))]
    extra = {} if arrival_time is None else {"arrival_time": arrival_time}
    return Sequence(request_id, ids, types, positions, mask, image_hash=image_hash,
                    sampling_params=SimpleNamespace(max_tokens=max_tokens), **extra)


def expected_kv(seq: Sequence, i: int) -> tuple:
    """What a token's KV depends on: its id, position, expert and (through attention) the image."""
    image = seq.image_hash if seq.image_span is not None else None
    return (seq.token_ids_slice(i, i + 1)[0], seq.position_ids_slice(i, i + 1)[0],
            seq.vision_expert_mask_slice(i, i + 1)[0], image)


class FakeModel:
    """Writes each computed token's 'KV' into a flat slot array by slot_mapping and derives the next token from
    what it reads back through the block table: a wrong block table or a bad cache hit breaks the outputs."""

    def __init__(self, bm: BlockManager) -> None:
        self.bm = bm
        self.kv: list = [None] * (bm.num_total_blocks * bm.block_size)

    def step(self, output: SchedulerOutput) -> dict[Sequence, int]:
        bs = self.bm.block_size
        for chunk in output.chunks:
            slots = self.bm.slot_mapping(chunk.seq, chunk.start, chunk.end)
            for block_id in {slot // bs for slot in slots}:
                assert self.bm.ref_count(block_id) == 1, "wrote into a shared block"
                assert self.bm.blocks[block_id].block_hash is None, "wrote into a published cached block"
            for i, slot in zip(range(chunk.start, chunk.end), slots):
                self.kv[slot] = expected_kv(chunk.seq, i)
        sampled = {}
        for chunk in output.chunks:
            if chunk.needs_sample:
                seq = chunk.seq
                read = [self.kv[slot] for slot in self.bm.slot_mapping(seq, 0, chunk.end)]
                assert read == [expected_kv(seq, i) for i in range(chunk.end)]
                sampled[seq] = next_token(seq.all_token_ids)
        return sampled


def next_token(token_ids: list[int]) -> int:
    return sum(token_ids) % 1000 + 5


def check_step(scheduler: Scheduler, output: SchedulerOutput) -> None:
    config = scheduler.config
    assert output.num_batched_tokens == sum(chunk.num_tokens for chunk in output.chunks)
    assert output.num_batched_tokens <= config.max_num_batched_tokens
    assert len(output.chunks) <= config.max_num_seqs and scheduler.num_running <= config.max_num_seqs
    assert len({id(chunk.seq) for chunk in output.chunks}) == len(output.chunks)
    kinds = [chunk.is_decode for chunk in output.chunks]
    assert kinds == sorted(kinds, reverse=True), "decodes must come before prefill chunks"
    for chunk in output.chunks:
        assert chunk.seq.status == SequenceStatus.RUNNING
        assert chunk.start == chunk.seq.num_computed_tokens and chunk.num_tokens > 0
        assert len(chunk.seq.block_table) * scheduler.block_manager.block_size >= chunk.end
    for seq in output.preempted:
        assert seq.status == SequenceStatus.WAITING and seq.block_table == []


class FakeEngine:
    """The engine loop around the scheduler: schedule, run the fake model, advance, append tokens, apply stops."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.model = FakeModel(scheduler.block_manager)

    def step(self) -> SchedulerOutput:
        output = self.scheduler.schedule()
        check_step(self.scheduler, output)
        sampled = self.model.step(output)
        self.scheduler.update_after_step(output)
        for seq, token in sampled.items():
            seq.output_token_ids.append(token)
            if seq.num_output_tokens >= seq.sampling_params.max_tokens or self.scheduler.reached_max_len(seq):
                self.scheduler.finish(seq, "length")
        return output

    def run(self, seqs=(), max_steps: int = 10_000) -> list[SchedulerOutput]:
        for seq in seqs:
            self.scheduler.add_request(seq)
        outputs = []
        while self.scheduler.has_unfinished():
            assert len(outputs) < max_steps, "no progress"
            outputs.append(self.step())
        return outputs


def run_engine(scheduler: Scheduler, seqs: list[Sequence]) -> list[SchedulerOutput]:
    return FakeEngine(scheduler).run(seqs)


def make_scheduler(num_blocks: int = 256, block_size: int = 4, prefix_caching: bool = True, **config) -> Scheduler:
    return Scheduler(SchedulerConfig(**config), BlockManager(num_blocks, block_size, prefix_caching))


def solo_outputs(seq_factory) -> list[int]:
    seq = seq_factory()
    run_engine(make_scheduler(num_blocks=1024), [seq])
    return seq.output_token_ids


def assert_no_leak(scheduler: Scheduler) -> None:
    bm = scheduler.block_manager
    assert bm.num_free_blocks == bm.num_total_blocks
    assert all(bm.ref_count(block_id) == 0 for block_id in range(bm.num_total_blocks))


# ---------------------------------------------------------------- Sequence


def test_sequence_metadata_covers_prompt_and_generated_tokens():
    seq = make_seq("r", [11, 12], num_image_tokens=5)  # BOS, boi, 3 patches, eoi, 11, 12
    assert seq.prompt_position_ids == [0, 1, 2, 2, 2, 3, 4, 5]
    seq.output_token_ids = [90, 91, 92]
    assert seq.num_tokens == 11 and seq.num_prompt_tokens == 8
    assert seq.all_token_ids == [BOS] + [IMAGE] * 5 + [11, 12, 90, 91, 92]
    assert seq.position_ids_slice(0, 11) == [0, 1, 2, 2, 2, 3, 4, 5, 6, 7, 8]
    assert seq.position_ids_slice(6, 10) == [4, 5, 6, 7]
    assert seq.position_ids_slice(9, 11) == [7, 8]
    assert seq.token_ids_slice(7, 10) == [12, 90, 91]
    assert seq.token_ids_slice(9, 11) == [91, 92]
    assert seq.prompt_token_type_ids + [0] * seq.num_output_tokens == [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    # boi and patches use the vision expert, eoi and generated tokens the language expert
    assert seq.vision_expert_mask_slice(0, 11) == [0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert [seq.vision_expert_mask_slice(i, i + 1)[0] for i in (4, 5, 9)] == [1, 0, 0]
    assert seq.image_span == (1, 6)


def test_text_only_defaults_and_prefill_state():
    seq = Sequence("t", [5, 6, 7])
    assert seq.prompt_position_ids == [0, 1, 2] and seq.image_span is None
    assert seq.is_prefill and seq.status == SequenceStatus.WAITING
    seq.num_computed_tokens = 3
    seq.output_token_ids.append(8)
    assert not seq.is_prefill  # decode: only the last sampled token lacks KV
    seq.num_computed_tokens = 0  # preempted: prompt and output are recomputed
    assert seq.is_prefill and seq.num_uncomputed_tokens == 4
    with pytest.raises(ValueError):
        Sequence("bad", [1, 2, 3], [0, 0], [0, 1, 2], [0, 0, 0])


# ---------------------------------------------------------------- scheduling policy


def test_fcfs_admission_and_limits_in_every_step():
    scheduler = make_scheduler(max_num_seqs=3, max_num_batched_tokens=20)
    seqs = [make_seq(f"r{k}", range(10 * k, 10 * k + 7), max_tokens=5) for k in range(7)]
    outputs = run_engine(scheduler, seqs)
    first_step = {}
    for step, output in enumerate(outputs):
        for chunk in output.chunks:
            first_step.setdefault(chunk.seq.request_id, step)
    assert [first_step[f"r{k}"] for k in range(7)] == sorted(first_step[f"r{k}"] for k in range(7))
    assert all(seq.finish_reason == "length" and seq.num_output_tokens == 5 for seq in seqs)
    assert scheduler.num_steps == len(outputs)
    assert_no_leak(scheduler)


def test_decodes_are_scheduled_before_new_prefills():
    scheduler = make_scheduler(max_num_batched_tokens=8)
    engine = FakeEngine(scheduler)
    for seq in (make_seq("d0", [1, 2]), make_seq("d1", [3, 4])):
        scheduler.add_request(seq)
    engine.step()
    scheduler.add_request(make_seq("long", range(100, 130)))
    output = engine.step()
    assert [(c.seq.request_id, c.num_tokens, c.is_decode) for c in output.chunks] == [
        ("d0", 1, True), ("d1", 1, True), ("long", 6, False)]


def test_running_decodes_are_not_starved_by_a_running_mid_prefill():
    scheduler = make_scheduler(max_num_batched_tokens=6)
    old_long = make_seq("long", range(100, 140), arrival_time=0.0)
    young = make_seq("young", [1], arrival_time=1.0)
    engine = FakeEngine(scheduler)
    scheduler.add_request(young)  # queued first, but arrived later (as a preempted old request would be)
    scheduler.add_request(old_long)
    first = engine.step()
    assert [(c.seq.request_id, c.num_tokens) for c in first.chunks] == [("young", 2), ("long", 4)]
    assert scheduler.running == [old_long, young]  # age order: "long" is the older one
    for _ in range(3):
        output = engine.step()
        # the running decode goes first although "long" is older, the prompt gets what is left
        assert [(c.seq.request_id, c.num_tokens) for c in output.chunks] == [("young", 1), ("long", 5)]
    assert young.num_output_tokens == 4 and old_long.is_prefill


def test_chunked_prefill_splits_a_long_prompt_and_its_image_span():
    scheduler = make_scheduler(max_num_batched_tokens=16)
    seq = make_seq("img", range(300, 320), num_image_tokens=40, image_hash="h", max_tokens=3)
    outputs = run_engine(scheduler, [seq])
    prefill_chunks = [c for o in outputs for c in o.chunks if not c.is_decode]
    assert [c.num_tokens for c in prefill_chunks] == [16, 16, 16, 13]
    assert [c.start for c in prefill_chunks] == [0, 16, 32, 48]
    assert sum(c.num_tokens for c in prefill_chunks) == seq.num_prompt_tokens == 61
    image_start, image_end = seq.image_span
    assert any(image_start < c.start < image_end for c in prefill_chunks)  # a boundary inside the image
    assert [c.needs_sample for c in prefill_chunks] == [False, False, False, True]
    assert scheduler.num_prefill_chunks == 3  # partial chunks only
    assert seq.output_token_ids == solo_outputs(
        lambda: make_seq("img", range(300, 320), num_image_tokens=40, image_hash="h", max_tokens=3))


def test_long_prefill_token_threshold_caps_chunks():
    scheduler = make_scheduler(max_num_batched_tokens=64, long_prefill_token_threshold=10)
    seq = make_seq("a", range(1, 25), max_tokens=2)  # 25 tokens
    outputs = run_engine(scheduler, [seq])
    assert [c.num_tokens for o in outputs for c in o.chunks] == [10, 10, 5, 1]


def test_without_chunked_prefill_prompts_run_whole():
    scheduler = make_scheduler(max_num_batched_tokens=16, enable_chunked_prefill=False, max_num_seqs=8)
    seqs = [make_seq(f"r{k}", range(10 * k, 10 * k + 9), max_tokens=3) for k in range(3)]  # 10 tokens each
    outputs = run_engine(scheduler, seqs)
    prefills = [(c.start, c.num_tokens) for o in outputs for c in o.chunks if not c.is_decode]
    assert prefills == [(0, 10)] * 3
    assert scheduler.num_prefill_chunks == 0
    assert_no_leak(scheduler)


# ---------------------------------------------------------------- preemption


def workload_seq(k: int) -> Sequence:
    """Mixed text and image prompts of different lengths; odd ones carry an image."""
    return make_seq(f"r{k}", range(50 * k, 50 * k + 5 + 3 * k), num_image_tokens=6 if k % 2 else 0,
                    image_hash=f"img{k}" if k % 2 else None, max_tokens=6 + k, arrival_time=float(k))


@pytest.mark.parametrize("block_size,num_blocks,budget,prefix_caching", [
    (4, 10, 12, True), (4, 10, 12, False), (1, 32, 8, True), (16, 3, 20, True), (2, 16, 8, False), (4, 9, 8, True)])
def test_preemption_with_a_tiny_pool_gives_the_same_tokens_as_running_alone(
        block_size, num_blocks, budget, prefix_caching):
    expected = {f"r{k}": solo_outputs(lambda: workload_seq(k)) for k in range(5)}
    scheduler = make_scheduler(num_blocks=num_blocks, block_size=block_size, prefix_caching=prefix_caching,
                               max_num_batched_tokens=budget)
    engine = FakeEngine(scheduler)
    seqs = [workload_seq(k) for k in range(5)]
    for seq in seqs:
        scheduler.add_request(seq)
    recomputed_outputs = False
    for _ in range(1000):
        if not scheduler.has_unfinished():
            break
        output = engine.step()
        recomputed_outputs |= any(seq.num_output_tokens > 0 for seq in output.preempted)
    assert not scheduler.has_unfinished()
    assert scheduler.num_preemptions > 0
    assert recomputed_outputs  # some preempted sequence had to recompute generated tokens too
    assert {seq.request_id: seq.output_token_ids for seq in seqs} == expected
    assert all(seq.finish_reason == "length" for seq in seqs)
    assert_no_leak(scheduler)


def needs_new_block(seq: Sequence, block_size: int) -> bool:
    return seq.num_tokens > len(seq.block_table) * block_size


def decode_until_a_block_is_missing(engine: FakeEngine, seqs: list[Sequence]) -> None:
    bm = engine.scheduler.block_manager
    for seq in seqs:
        engine.scheduler.add_request(seq)
    for _ in range(100):
        if bm.num_free_blocks == 0 and any(needs_new_block(seq, bm.block_size) for seq in seqs):
            return
        assert not engine.step().preempted
    raise AssertionError("the pool never filled up")


def test_the_newest_running_sequence_is_preempted_and_requeued_first():
    scheduler = make_scheduler(num_blocks=4, block_size=4, max_num_batched_tokens=32)
    old, new = make_seq("old", [1, 2, 3], arrival_time=0.0), make_seq("new", [4, 5], arrival_time=1.0)
    engine = FakeEngine(scheduler)
    decode_until_a_block_is_missing(engine, [old, new])
    assert needs_new_block(old, 4) and not needs_new_block(new, 4)
    waiting = make_seq("waiting", [9], arrival_time=2.0)
    scheduler.add_request(waiting)
    output = engine.step()
    assert output.preempted == [new]
    assert [c.seq for c in output.chunks] == [old]  # no admission in a step that preempted
    assert list(scheduler.waiting) == [new, waiting]
    assert new.num_computed_tokens == 0 and new.block_table == []
    assert scheduler.num_preemptions == 1


def test_the_requester_preempts_itself_when_it_is_the_newest():
    scheduler = make_scheduler(num_blocks=4, block_size=4, max_num_batched_tokens=32)
    old, new = make_seq("old", [1, 2], arrival_time=0.0), make_seq("new", [4, 5, 6], arrival_time=1.0)
    engine = FakeEngine(scheduler)
    decode_until_a_block_is_missing(engine, [old, new])
    assert needs_new_block(new, 4) and not needs_new_block(old, 4)
    output = engine.step()
    assert output.preempted == [new]
    assert [c.seq for c in output.chunks] == [old]
    assert old.status == SequenceStatus.RUNNING


# ---------------------------------------------------------------- prefix caching through the scheduler


def test_identical_request_hits_the_prefix_cache_and_a_different_image_does_not():
    scheduler = make_scheduler(block_size=4)
    engine = FakeEngine(scheduler)
    first = make_seq("a", range(1, 12), num_image_tokens=10, image_hash="img", max_tokens=4)
    engine.run([first])
    bm = scheduler.block_manager
    hits_before = bm.prefix_cache_hit_tokens

    same = make_seq("b", range(1, 12), num_image_tokens=10, image_hash="img", max_tokens=4)
    engine.run([same])
    assert same.num_cached_prompt_tokens == 20  # 22-token prompt: 5 full blocks, the last one recomputed
    assert bm.prefix_cache_hit_tokens == hits_before + 20
    assert same.output_token_ids == first.output_token_ids

    other = make_seq("c", range(1, 12), num_image_tokens=10, image_hash="other", max_tokens=4)
    engine.run([other])
    assert other.num_cached_prompt_tokens == 0

    text = make_seq("d", list(range(1, 12)) + [500, 501])
    text_prefix = make_seq("e", list(range(1, 12)) + [600])
    engine.run([text])
    engine.run([text_prefix])
    assert text_prefix.num_cached_prompt_tokens == 12  # the 3 full blocks shared with "d"
    assert_no_leak(scheduler)


def test_concurrent_requests_share_prefix_blocks_and_finishing_one_keeps_the_other_valid():
    scheduler = make_scheduler(num_blocks=64, block_size=4)
    engine = FakeEngine(scheduler)
    leader = make_seq("leader", range(1, 17), max_tokens=3)  # 17 tokens: 4 full blocks
    scheduler.add_request(leader)
    engine.step()
    follower = make_seq("follower", list(range(1, 17)) + [70, 71], max_tokens=5)
    scheduler.add_request(follower)
    engine.step()
    assert follower.num_cached_prompt_tokens == 16
    shared = follower.block_table[:4]
    assert shared == leader.block_table[:4]
    assert all(scheduler.block_manager.ref_count(b) == 2 for b in shared)
    scheduler.finish(leader, "stop")
    assert all(scheduler.block_manager.ref_count(b) == 1 for b in shared)
    engine.run()  # the follower keeps reading the shared blocks (FakeModel checks their content)
    assert follower.output_token_ids == solo_outputs(
        lambda: make_seq("follower", list(range(1, 17)) + [70, 71], max_tokens=5))
    assert_no_leak(scheduler)


def test_evictable_cached_blocks_are_reused_when_the_pool_is_full():
    scheduler = make_scheduler(num_blocks=6, block_size=4, max_num_batched_tokens=64)
    engine = FakeEngine(scheduler)
    seqs = [make_seq(f"r{k}", range(100 * k, 100 * k + 15), max_tokens=4) for k in range(5)]
    for seq in seqs:  # each needs 5 of the 6 blocks and leaves its full blocks cached
        engine.run([seq])
        assert seq.finish_reason == "length"
    assert scheduler.block_manager.num_cached_blocks > 0
    assert scheduler.num_preemptions == 0
    assert_no_leak(scheduler)


# ---------------------------------------------------------------- aborts, rejections, length cap


def test_abort_of_waiting_and_running_requests_frees_blocks():
    scheduler = make_scheduler(max_num_seqs=1)
    running, waiting = make_seq("run", range(1, 20)), make_seq("wait", range(30, 40))
    scheduler.add_request(running)
    scheduler.add_request(waiting)
    engine = FakeEngine(scheduler)
    engine.step()
    engine.step()
    assert running.status == SequenceStatus.RUNNING and waiting.status == SequenceStatus.WAITING
    assert scheduler.abort("wait") is waiting and waiting.finish_reason == "abort"
    assert scheduler.abort("run") is running and running.finish_reason == "abort"
    assert running.block_table == [] and not scheduler.has_unfinished()
    assert scheduler.abort("run") is None and scheduler.abort("unknown") is None
    assert_no_leak(scheduler)


def test_abort_while_a_step_is_in_flight_is_ignored_by_update():
    scheduler = make_scheduler()
    seq = make_seq("a", range(1, 9))
    scheduler.add_request(seq)
    output = scheduler.schedule()
    scheduler.abort("a")
    scheduler.update_after_step(output)
    assert seq.num_computed_tokens == 0 and seq.is_finished
    assert_no_leak(scheduler)


@pytest.mark.parametrize("config,num_blocks,prompt_len,words", [
    ({"max_model_len": 32}, 256, 40, ["max_model_len=32", "40"]),
    ({"max_model_len": 4096}, 5, 30, ["8 KV cache blocks", "5 blocks"]),
    ({"max_num_batched_tokens": 16, "enable_chunked_prefill": False}, 256, 20,
     ["max_num_batched_tokens=16", "20", "chunked prefill"]),
])
def test_requests_that_can_never_fit_are_rejected_with_the_limit(config, num_blocks, prompt_len, words):
    scheduler = make_scheduler(num_blocks=num_blocks, block_size=4, **config)
    seq = make_seq("big", range(1, prompt_len))
    assert seq.num_prompt_tokens == prompt_len
    assert scheduler.add_request(seq) is False
    assert seq.is_finished and seq.finish_reason == "error"
    assert all(word in seq.error for word in words), seq.error
    assert not scheduler.has_unfinished() and scheduler.num_waiting == 0
    assert scheduler.take_rejected() == [seq] and scheduler.take_rejected() == []


def test_empty_prompt_and_duplicate_ids_are_rejected():
    scheduler = make_scheduler()
    assert not scheduler.add_request(Sequence("empty", []))
    assert scheduler.add_request(make_seq("dup", [1]))
    assert not scheduler.add_request(make_seq("dup", [2]))
    assert [seq.error for seq in scheduler.take_rejected()] == [
        "request empty: the prompt is empty", "request dup: request_id 'dup' is already in use"]


def test_generation_stops_at_max_model_len():
    scheduler = make_scheduler(max_model_len=12)
    seq = make_seq("a", range(1, 8), max_tokens=100)  # 8 prompt tokens
    run_engine(scheduler, [seq])
    assert seq.num_tokens == 12 and seq.finish_reason == "length"


def test_a_sequence_is_capped_to_what_the_pool_can_hold_alone():
    scheduler = make_scheduler(num_blocks=3, block_size=4, max_model_len=4096)
    assert scheduler.max_seq_len == 12
    seq = make_seq("a", range(1, 8), max_tokens=100)
    run_engine(scheduler, [seq])
    assert seq.num_tokens == 12 and scheduler.num_preemptions == 0
