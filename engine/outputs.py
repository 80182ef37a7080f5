"""What the engine returns per request (vLLM's shapes). `LLMEngine.step` yields deltas: each RequestOutput holds
only what is new since the request's previous output (text, token ids, logprobs); `add` accumulates them."""
from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class CompletionOutput:
    """`token_ids` exclude the EOS / stop token id that ended generation (stop strings keep their tokens)."""
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"; None while running
    logprobs: list[dict[int, float]] | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that matched

    def add(self, delta: "CompletionOutput") -> None:
        self.text += delta.text
        self.token_ids += delta.token_ids
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.logprobs
        self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    error: str | None = None
    num_cached_tokens: int = 0

    @classmethod
    def failed(cls, request_id: str, prompt: str | None, arrival_time: float, message: str) -> "RequestOutput":
        """A request that ended with an error before producing anything (finish_reason "error")."""
        return cls(request_id, prompt, [], [CompletionOutput(0, "", [], "error")], True,
                   RequestMetrics(arrival_time, finished_time=time.monotonic()), error=message)

    def copy(self) -> "RequestOutput":
        """A copy whose lists can be extended by `add` without touching the delta it was made from."""
        outputs = [CompletionOutput(o.index, o.text, list(o.token_ids), o.finish_reason,
                                    list(o.logprobs) if o.logprobs is not None else None, o.stop_reason)
                   for o in self.outputs]
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outputs, self.finished,
                             self.metrics, self.error, self.num_cached_tokens)

    def add(self, delta: "RequestOutput") -> None:
        """Accumulate the next delta of the same request into this output."""
        for mine, new in zip(self.outputs, delta.outputs):
            mine.add(new)
        self.finished, self.metrics, self.error = delta.finished, delta.metrics, delta.error
        self.num_cached_tokens = delta.num_cached_tokens


def accumulate(outputs: dict[str, RequestOutput], delta: RequestOutput) -> RequestOutput:
    """Adds a step's delta to its request's output in `outputs` (keyed by request id); returns that output."""
    output = outputs.get(delta.request_id)
    if output is None:
        output = outputs[delta.request_id] = delta.copy()
    else:
        output.add(delta)
    return output
