"""Request state: one sequence (one completion of a request) with its prompt metadata, generated tokens and KV
block table."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass(eq=False)  # identity semantics: sequences are used as set members and dict keys
class Sequence:
    """One request. Token index i runs over the prompt then the generated tokens.

    Empty `prompt_token_type_ids` / `prompt_position_ids` / `prompt_vision_expert_mask` mean a text-only
    prompt: types 0, positions 0..L-1, language expert everywhere.
    """
    request_id: str
    prompt_token_ids: list[int]
    prompt_token_type_ids: list[int] = field(default_factory=list)
    prompt_position_ids: list[int] = field(default_factory=list)
    prompt_vision_expert_mask: list[int] = field(default_factory=list)
    image_hash: str | None = None
    pixel_values: Any = None
    sampling_params: Any = None
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    num_cached_prompt_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None  # when the latest output token was sampled
    finished_time: float | None = None
    # Content hashes of the full blocks of all_token_ids, filled lazily by the block manager. They depend only
    # on the tokens, so they survive preemption.
    block_hashes: list[bytes] = field(default_factory=list, repr=False)
    # False when the prompt's logits are wanted (prompt_logprobs): cached blocks would skip computing them.
    reads_prefix_cache: bool = True
    # n > 1: the first copy computes the prompt; the others (its prompt_copies, each with prompt_source set to it)
    # wait for that and share its full prompt blocks (Scheduler, BlockManager.share_prompt).
    prompt_copies: list["Sequence"] = field(default_factory=list, repr=False)
    prompt_source: "Sequence | None" = field(default=None, repr=False)
    # Half-open [start, end) token indices of the image span (token type 1), or None for text-only.
    image_span: tuple[int, int] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        n = len(self.prompt_token_ids)
        if not self.prompt_token_type_ids:
            self.prompt_token_type_ids = [0] * n
        if not self.prompt_position_ids:
            self.prompt_position_ids = list(range(n))
        if not self.prompt_vision_expert_mask:
            self.prompt_vision_expert_mask = [0] * n
        lengths = {len(self.prompt_token_type_ids), len(self.prompt_position_ids),
                   len(self.prompt_vision_expert_mask)}
        if lengths != {n}:
            raise ValueError(f"request {self.request_id}: prompt metadata lengths {sorted(lengths)} "
                             f"do not match the {n} prompt tokens")
        types = self.prompt_token_type_ids
        if 1 in types:
            self.image_span = (types.index(1), n - types[::-1].index(1))

    # ---- sizes and state
    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_output_tokens

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        """More than one token lacks KV: a new prompt, or prompt + outputs to recompute after preemption.

        In steady decoding exactly one token (the last sampled one) lacks KV; its logits give the next token.
        """
        return self.num_uncomputed_tokens > 1

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    # ---- per-token metadata for any token index (prompt or generated)
    def token_ids_slice(self, start: int, end: int) -> list[int]:
        prompt_len = self.num_prompt_tokens
        if end <= prompt_len:
            return self.prompt_token_ids[start:end]
        return (self.prompt_token_ids[start:end]
                + self.output_token_ids[max(start - prompt_len, 0):end - prompt_len])

    def position_ids_slice(self, start: int, end: int) -> list[int]:
        prompt_len = self.num_prompt_tokens
        next_position = self.prompt_position_ids[-1] + 1 - prompt_len  # generated token i: i + this
        return (self.prompt_position_ids[start:end]
                + list(range(max(start, prompt_len) + next_position, end + next_position)))

    def vision_expert_mask_slice(self, start: int, end: int) -> list[int]:
        generated = max(end - max(start, self.num_prompt_tokens), 0)
        return self.prompt_vision_expert_mask[start:end] + [0] * generated
