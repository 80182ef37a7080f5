"""What the engine returns per request (vLLM's shapes). `LLMEngine.step` yields deltas: each RequestOutput holds
only what is new since the request's previous output (text, token ids, logprobs), and only for the completions
(of a request with n > 1) that progressed; `add` accumulates them."""
from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class Logprob:
    """One token's entry in a logprobs dict (vLLM's shape). rank: 1 = the most likely token of its position."""
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# Per generated (or prompt) token: token id -> Logprob, the chosen token first, then the top-k by rank.
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    """`token_ids` exclude the EOS / stop token id that ended generation (stop strings keep their tokens)."""
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"; None while running
    logprobs: list[PositionLogprobs] | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that matched
    cumulative_logprob: float | None = None  # sum of the chosen tokens' logprobs so far (when logprobs are asked)

    def add(self, delta: "CompletionOutput") -> None:
        self.text += delta.text
        self.token_ids += delta.token_ids
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.logprobs
        self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason
        self.cumulative_logprob = delta.cumulative_logprob

    def copy(self) -> "CompletionOutput":
        return CompletionOutput(self.index, self.text, list(self.token_ids), self.finish_reason,
                                list(self.logprobs) if self.logprobs is not None else None, self.stop_reason,
                                self.cumulative_logprob)


@dataclass
class RequestMetrics:
    """time.monotonic() of a request's events. first_token_time is the first sampling (even of an EOS that ends
    the request at once); last_token_time the sampling of the output's latest token."""
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    last_token_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]  # by index; a delta holds only the completions that progressed
    finished: bool
    metrics: RequestMetrics
    error: str | None = None
    num_cached_tokens: int = 0
    # With SamplingParams.prompt_logprobs: one entry per prompt token, None for the first (nothing predicts it).
    # Sent once, in the first delta after the whole prompt was computed.
    prompt_logprobs: list[PositionLogprobs | None] | None = None

    @classmethod
    def failed(cls, request_id: str, prompt: str | None, arrival_time: float, message: str) -> "RequestOutput":
        """A request that ended with an error before producing anything (finish_reason "error")."""
        return cls(request_id, prompt, [], [CompletionOutput(0, "", [], "error")], True,
                   RequestMetrics(arrival_time, finished_time=time.monotonic()), error=message)

    def copy(self) -> "RequestOutput":
        """A copy whose lists can be extended by `add` without touching the delta it was made from."""
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, [o.copy() for o in self.outputs],
                             self.finished, self.metrics, self.error, self.num_cached_tokens, self.prompt_logprobs)

    def add(self, delta: "RequestOutput") -> None:
        """Accumulate the next delta of the same request into this output (completions matched by index)."""
        mine = {o.index: o for o in self.outputs}
        for new in delta.outputs:
            if new.index in mine:
                mine[new.index].add(new)
            else:
                self.outputs.append(new.copy())
        self.outputs.sort(key=lambda o: o.index)
        self.finished, self.metrics, self.error = delta.finished, delta.metrics, delta.error
        self.num_cached_tokens = delta.num_cached_tokens
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs


def merge_deltas(deltas: list[RequestOutput]) -> list[RequestOutput]:
    """One delta per request: the deltas of a request's completions in one step, merged (first-seen order)."""
    merged: dict[str, RequestOutput] = {}
    for delta in deltas:
        if delta.request_id in merged:
            merged[delta.request_id].add(delta)
        else:
            merged[delta.request_id] = delta
    return list(merged.values())


def accumulate(outputs: dict[str, RequestOutput], delta: RequestOutput) -> RequestOutput:
    """Adds a step's delta to its request's output in `outputs` (keyed by request id); returns that output."""
    output = outputs.get(delta.request_id)
    if output is None:
        output = outputs[delta.request_id] = delta.copy()
    else:
        output.add(delta)
    return output
