"""Continuous batching under a token budget, with chunked prefill and preemption by recompute.

Each step: running decodes first, then running sequences still mid-prefill, then waiting sequences FCFS, while
the step stays within max_num_batched_tokens and max_num_seqs. When a running sequence needs a block and the
pool is empty, the newest running sequence not yet scheduled in this step is preempted (its KV is dropped and
recomputed later); if that is the requester itself, it is the one preempted. The copies of a request with n > 1
are passed over in the queue until their source has computed the prompt, then share its blocks.
"""
from __future__ import annotations

import bisect
import time
from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int | None = None  # cap on one prefill chunk, so decodes keep flowing

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.long_prefill_token_threshold is not None and self.long_prefill_token_threshold <= 0:
            raise ValueError(f"long_prefill_token_threshold must be positive, got {self.long_prefill_token_threshold}")


@dataclass
class ScheduledChunk:
    """Tokens [start, start + num_tokens) of seq to compute in this step."""
    seq: Sequence
    start: int
    num_tokens: int
    # Fixed at scheduling time: the engine appends the sampled token afterwards, which changes seq.num_tokens.
    needs_sample: bool = field(init=False)

    def __post_init__(self) -> None:
        self.needs_sample = self.start + self.num_tokens == self.seq.num_tokens

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def is_decode(self) -> bool:
        return self.num_tokens == 1 and self.needs_sample


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk]  # decodes first, then prefill chunks
    num_batched_tokens: int
    preempted: list[Sequence]

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest arrival first
        self._unfinished: dict[str, Sequence] = {}
        self._rejected: list[Sequence] = []
        self.num_preemptions = 0
        self.num_prefill_chunks = 0  # partial prefill chunks: chunks after which the sequence still has tokens to compute
        self.num_steps = 0
        self.num_computed_prompt_tokens = 0  # prompt tokens whose KV was computed (not shared, not cached)

    # ---- limits
    @property
    def max_seq_len(self) -> int:
        """Total tokens (prompt + output) at which a sequence stops with "length".

        Besides max_model_len: a sequence must fit the whole KV pool on its own (or preempting everyone else
        would not let it progress), and without chunked prefill its recompute after preemption must fit one step.
        """
        bm = self.block_manager
        limit = min(self.config.max_model_len, bm.num_total_blocks * bm.block_size)
        if not self.config.enable_chunked_prefill:
            limit = min(limit, self.config.max_num_batched_tokens)
        return limit

    def reached_max_len(self, seq: Sequence) -> bool:
        return seq.num_tokens >= self.max_seq_len

    def _rejection_reason(self, seq: Sequence) -> str | None:
        num_prompt = seq.num_prompt_tokens
        bm = self.block_manager
        if seq.request_id in self._unfinished:
            return f"request_id {seq.request_id!r} is already in use"
        if num_prompt == 0:
            return "the prompt is empty"
        if num_prompt > self.config.max_model_len:
            return f"the prompt has {num_prompt} tokens, more than max_model_len={self.config.max_model_len}"
        if bm.num_blocks_for(num_prompt) > bm.num_total_blocks:
            return (f"the prompt needs {bm.num_blocks_for(num_prompt)} KV cache blocks of {bm.block_size} tokens, "
                    f"more than the {bm.num_total_blocks} blocks in the cache")
        if not self.config.enable_chunked_prefill and num_prompt > self.config.max_num_batched_tokens:
            return (f"the prompt has {num_prompt} tokens, more than max_num_batched_tokens="
                    f"{self.config.max_num_batched_tokens} (chunked prefill is disabled)")
        return None

    # ---- requests
    def add_request(self, seq: Sequence) -> bool:
        """Queue seq, or finish it with finish_reason "error" if it can never run (see take_rejected)."""
        reason = self._rejection_reason(seq)
        if reason is not None:
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = "error"
            seq.error = f"request {seq.request_id}: {reason}"
            seq.finished_time = time.monotonic()
            self._rejected.append(seq)
            return False
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self._unfinished[seq.request_id] = seq
        return True

    def take_rejected(self) -> list[Sequence]:
        rejected, self._rejected = self._rejected, []
        return rejected

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq.is_finished:
            return
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        self._unfinished.pop(seq.request_id, None)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.finished_time = time.monotonic()

    def abort(self, request_id: str) -> Sequence | None:
        seq = self._unfinished.get(request_id)
        if seq is not None:
            self.finish(seq, "abort")
        return seq

    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- one step
    def schedule(self) -> SchedulerOutput:
        step = _StepBuilder(self.config.max_num_batched_tokens)
        decodes = [seq for seq in self.running if not seq.is_prefill]
        mid_prefills = [seq for seq in self.running if seq.is_prefill]
        for seq in decodes + mid_prefills:
            if seq.status == SequenceStatus.RUNNING and step.budget > 0:
                self._schedule_running(seq, step)
        if not step.preempted:  # admitting new work right after preempting would only thrash
            self._schedule_waiting(step)
        step.chunks.sort(key=lambda chunk: not chunk.is_decode)  # stable: keeps age order within each group
        self.num_prefill_chunks += sum(1 for chunk in step.chunks if not chunk.needs_sample)
        return SchedulerOutput(step.chunks, step.num_batched_tokens, step.preempted)

    def _chunk_size(self, num_remaining: int, budget: int) -> int:
        size = min(num_remaining, budget)
        threshold = self.config.long_prefill_token_threshold
        if threshold is not None and num_remaining > 1:
            size = min(size, threshold)
        return size

    def _schedule_running(self, seq: Sequence, step: _StepBuilder) -> None:
        num_new = self._chunk_size(seq.num_uncomputed_tokens, step.budget)
        if num_new == 0:
            return
        while not self.block_manager.append_slots(seq, num_new):
            victim = self._newest_unscheduled_running(step)
            self._preempt(victim)
            step.preempted.append(victim)
            if victim is seq:
                return
        step.add(ScheduledChunk(seq, seq.num_computed_tokens, num_new))

    def _newest_unscheduled_running(self, step: _StepBuilder) -> Sequence:
        # The requester itself is unscheduled, so this never picks a sequence older than it.
        return next(seq for seq in reversed(self.running) if seq not in step.scheduled)

    def _schedule_waiting(self, step: _StepBuilder) -> None:
        awaiting: list[Sequence] = []  # copies whose prompt is still being computed by their source: passed over
        try:
            while self.waiting and step.budget > 0 and len(self.running) < self.config.max_num_seqs:
                if _awaits_prompt(self.waiting[0]):
                    awaiting.append(self.waiting.popleft())
                elif not self._admit_head(step):
                    break
        finally:
            self.waiting.extendleft(reversed(awaiting))

    def _admit_head(self, step: _StepBuilder) -> bool:
        """Schedule the first waiting sequence; False (nothing changed) if it does not fit this step."""
        bm = self.block_manager
        seq = self.waiting[0]
        num_remaining = seq.num_tokens - bm.num_cached_tokens(seq)
        if self.config.enable_chunked_prefill:
            num_new = self._chunk_size(num_remaining, step.budget)
        elif num_remaining <= step.budget:
            num_new = num_remaining
        else:
            return False  # FCFS: nothing overtakes the head of the queue
        if not bm.allocate(seq, num_new):
            return False
        self.waiting.popleft()
        seq.status = SequenceStatus.RUNNING
        if seq.first_scheduled_time is None:
            seq.first_scheduled_time = time.monotonic()
        bisect.insort(self.running, seq, key=lambda s: s.arrival_time)
        step.add(ScheduledChunk(seq, seq.num_computed_tokens, num_new))
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def update_after_step(self, output: SchedulerOutput) -> None:
        """The step wrote KV for every scheduled chunk: advance the sequences and publish full blocks."""
        for chunk in output.chunks:
            seq = chunk.seq
            if seq.is_finished:  # aborted while the step ran
                continue
            seq.num_computed_tokens += chunk.num_tokens
            self.num_computed_prompt_tokens += max(min(chunk.end, seq.num_prompt_tokens) - chunk.start, 0)
            self.block_manager.commit_computed(seq)
            if seq.prompt_copies and chunk.start < seq.num_prompt_tokens <= seq.num_computed_tokens:
                self._share_prompt(seq)
        self.num_steps += 1

    def _share_prompt(self, source: Sequence) -> None:
        """The source's prompt is computed: its waiting copies take its full prompt blocks now, before a stop
        could free them."""
        for copy in source.prompt_copies:
            if copy.status == SequenceStatus.WAITING and not copy.block_table:
                self.block_manager.share_prompt(source, copy)


def _awaits_prompt(seq: Sequence) -> bool:
    """A copy of an n > 1 request waits while its source computes the prompt (then shares its blocks)."""
    source = seq.prompt_source
    return (source is not None and not seq.block_table and not source.is_finished
            and source.num_computed_tokens < source.num_prompt_tokens)


@dataclass
class _StepBuilder:
    budget: int
    chunks: list[ScheduledChunk] = field(default_factory=list)
    scheduled: set[Sequence] = field(default_factory=set)
    preempted: list[Sequence] = field(default_factory=list)
    num_batched_tokens: int = 0

    def add(self, chunk: ScheduledChunk) -> None:
        self.chunks.append(chunk)
        self.scheduled.add(chunk.seq)
        self.budget -= chunk.num_tokens
        self.num_batched_tokens += chunk.num_tokens
