"""Engine outputs -> OpenAI JSON: whole responses, stream chunks, usage and logprobs, for chat and completions."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from engine.outputs import RequestOutput

LOGPROB_FLOOR = -9999.0  # JSON has no -inf; OpenAI reports this value instead


@dataclass
class Result:
    """A request's output accumulated from its deltas."""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0

    def add(self, delta: RequestOutput) -> None:
        out = delta.outputs[0]
        self.text += out.text
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs or []
        self.finish_reason = out.finish_reason
        self.num_prompt_tokens = len(delta.prompt_token_ids)
        self.num_cached_tokens = delta.num_cached_tokens

    def usage(self) -> dict[str, Any]:
        return {"prompt_tokens": self.num_prompt_tokens, "completion_tokens": len(self.token_ids),
                "total_tokens": self.num_prompt_tokens + len(self.token_ids),
                "prompt_tokens_details": {"cached_tokens": self.num_cached_tokens}}


def _token_entry(tokenizer, token_id: int, logprob: float) -> dict[str, Any]:
    raw = tokenizer.token_bytes(token_id)
    return {"token": raw.decode("utf-8", errors="replace"), "logprob": max(logprob, LOGPROB_FLOOR),
            "bytes": list(raw)}


def _top(logprobs: dict[int, float], n: int) -> list[tuple[int, float]]:
    return sorted(logprobs.items(), key=lambda item: -item[1])[:n]


@dataclass
class OutputFormat:
    """How one endpoint shapes its JSON: streamed chunks, the usage chunk, the whole response."""
    id: str
    model: str
    created: int
    tokenizer: Any
    top_logprobs: int | None  # None: no logprobs asked
    include_usage: bool = False
    chunk_object: ClassVar[str]
    response_object: ClassVar[str]

    def choice(self, text: str, token_ids: list[int], logprobs: list[dict[int, float]] | None,
               finish_reason: str | None, streamed: bool) -> dict[str, Any]:
        raise NotImplementedError

    def opening(self) -> list[dict[str, Any]]:
        return []

    def chunk(self, delta: RequestOutput) -> dict[str, Any] | None:
        out = delta.outputs[0]
        if not out.text and not out.token_ids and not delta.finished:
            return None
        reason = out.finish_reason if delta.finished else None
        return self._envelope(self.chunk_object, [self.choice(out.text, out.token_ids, out.logprobs, reason, True)])

    def usage_chunk(self, result: Result) -> dict[str, Any]:
        return {**self._envelope(self.chunk_object, []), "usage": result.usage()}

    def response(self, result: Result) -> dict[str, Any]:
        choice = self.choice(result.text, result.token_ids, result.logprobs, result.finish_reason, False)
        return {**self._envelope(self.response_object, [choice]), "usage": result.usage()}

    def _envelope(self, obj: str, choices: list) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}


@dataclass
class ChatFormat(OutputFormat):
    chunk_object: ClassVar[str] = "chat.completion.chunk"
    response_object: ClassVar[str] = "chat.completion"

    def opening(self) -> list[dict[str, Any]]:
        first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return [self._envelope(self.chunk_object, [first])]

    def choice(self, text: str, token_ids: list[int], logprobs: list[dict[int, float]] | None,
               finish_reason: str | None, streamed: bool) -> dict[str, Any]:
        body = {"delta": {"content": text} if text else {}} if streamed else \
            {"message": {"role": "assistant", "content": text}}
        return {"index": 0, **body, "logprobs": self._logprobs(token_ids, logprobs), "finish_reason": finish_reason}

    def _logprobs(self, token_ids: list[int], logprobs: list[dict[int, float]] | None) -> dict | None:
        if self.top_logprobs is None:
            return None
        content = []
        for token_id, candidates in zip(token_ids, logprobs or []):
            entry = _token_entry(self.tokenizer, token_id, candidates[token_id])
            entry["top_logprobs"] = [_token_entry(self.tokenizer, t, lp)
                                     for t, lp in _top(candidates, self.top_logprobs)]
            content.append(entry)
        return {"content": content}


@dataclass
class CompletionFormat(OutputFormat):
    chunk_object: ClassVar[str] = "text_completion"
    response_object: ClassVar[str] = "text_completion"
    _text_offset: int = 0

    def choice(self, text: str, token_ids: list[int], logprobs: list[dict[int, float]] | None,
               finish_reason: str | None, streamed: bool) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": self._logprobs(token_ids, logprobs),
                "finish_reason": finish_reason}

    def _logprobs(self, token_ids: list[int], logprobs: list[dict[int, float]] | None) -> dict | None:
        if self.top_logprobs is None:
            return None
        tokens, token_logprobs, tops, offsets = [], [], [], []
        for token_id, candidates in zip(token_ids, logprobs or []):
            entry = _token_entry(self.tokenizer, token_id, candidates[token_id])
            tokens.append(entry["token"])
            token_logprobs.append(entry["logprob"])
            tops.append({_token_entry(self.tokenizer, t, lp)["token"]: max(lp, LOGPROB_FLOOR)
                         for t, lp in _top(candidates, self.top_logprobs)})
            offsets.append(self._text_offset)
            self._text_offset += len(entry["token"])
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}
