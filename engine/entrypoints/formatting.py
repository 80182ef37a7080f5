"""Engine outputs -> OpenAI JSON: whole responses, stream chunks, usage and logprobs, for chat and completions
(n choices, each by its index)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from engine.outputs import CompletionOutput, PositionLogprobs, RequestOutput

LOGPROB_FLOOR = -9999.0  # JSON has no -inf; OpenAI reports this value instead


@dataclass
class ChoiceResult:
    """One completion accumulated from its deltas."""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, out: CompletionOutput) -> None:
        self.text += out.text
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs or []
        self.finish_reason = out.finish_reason


@dataclass
class Result:
    """A request's output accumulated from its deltas: its choices by index, usage, prompt logprobs."""
    choices: dict[int, ChoiceResult] = field(default_factory=dict)
    prompt_token_ids: list[int] = field(default_factory=list)
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0

    def add(self, delta: RequestOutput) -> None:
        for out in delta.outputs:
            self.choices.setdefault(out.index, ChoiceResult()).add(out)
        self.prompt_token_ids = delta.prompt_token_ids
        self.prompt_logprobs = delta.prompt_logprobs or self.prompt_logprobs
        self.num_cached_tokens = delta.num_cached_tokens

    def usage(self) -> dict[str, Any]:
        prompt, completion = len(self.prompt_token_ids), sum(len(c.token_ids) for c in self.choices.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": self.num_cached_tokens}}


def _token_entry(tokenizer, token_id: int, logprob: float) -> dict[str, Any]:
    raw = tokenizer.token_bytes(token_id)
    return {"token": raw.decode("utf-8", errors="replace"), "logprob": max(logprob, LOGPROB_FLOOR),
            "bytes": list(raw)}


def _top(entries: PositionLogprobs, n: int) -> list[tuple[int, float]]:
    """The n most likely tokens of a position (by rank; the chosen token only if it is one of them)."""
    ranked = sorted((e.rank, t, e.logprob) for t, e in entries.items() if e.rank is not None and e.rank <= n)
    return [(t, lp) for _, t, lp in ranked]


def _prompt_logprobs_json(positions: list[PositionLogprobs | None]) -> list[dict[str, dict] | None]:
    """vLLM's response field: per prompt token, {token id: {logprob, rank, decoded_token}} (None for the first)."""
    return [None if entries is None else
            {str(t): {"logprob": max(e.logprob, LOGPROB_FLOOR), "rank": e.rank, "decoded_token": e.decoded_token}
             for t, e in entries.items()} for entries in positions]


@dataclass
class OutputFormat:
    """How one endpoint shapes its JSON: streamed chunks, the usage chunk, the whole response."""
    id: str
    model: str
    created: int
    tokenizer: Any
    top_logprobs: int | None  # None: no logprobs asked
    include_usage: bool = False
    n: int = 1
    chunk_object: ClassVar[str]
    response_object: ClassVar[str]

    def choice(self, index: int, text: str, token_ids: list[int], logprobs: list[PositionLogprobs] | None,
               finish_reason: str | None, streamed: bool) -> dict[str, Any]:
        raise NotImplementedError

    def opening(self) -> list[dict[str, Any]]:
        return []

    def chunk(self, delta: RequestOutput) -> dict[str, Any] | None:
        choices = [self.choice(out.index, out.text, out.token_ids, out.logprobs, out.finish_reason, True)
                   for out in delta.outputs if out.text or out.token_ids or out.finish_reason is not None]
        return self._envelope(self.chunk_object, choices) if choices else None

    def usage_chunk(self, result: Result) -> dict[str, Any]:
        return {**self._envelope(self.chunk_object, []), "usage": result.usage()}

    def response(self, result: Result) -> dict[str, Any]:
        choices = [self.choice(i, c.text, c.token_ids, c.logprobs, c.finish_reason, False)
                   for i, c in sorted(result.choices.items())]
        body = {**self._envelope(self.response_object, choices), "usage": result.usage()}
        if result.prompt_logprobs is not None:
            body["prompt_logprobs"] = _prompt_logprobs_json(result.prompt_logprobs)
        return body

    def _envelope(self, obj: str, choices: list) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}


@dataclass
class ChatFormat(OutputFormat):
    chunk_object: ClassVar[str] = "chat.completion.chunk"
    response_object: ClassVar[str] = "chat.completion"

    def opening(self) -> list[dict[str, Any]]:
        first = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                 for i in range(self.n)]
        return [self._envelope(self.chunk_object, first)]

    def choice(self, index: int, text: str, token_ids: list[int], logprobs: list[PositionLogprobs] | None,
               finish_reason: str | None, streamed: bool) -> dict[str, Any]:
        body = {"delta": {"content": text} if text else {}} if streamed else \
            {"message": {"role": "assistant", "content": text}}
        return {"index": index, **body, "logprobs": self._logprobs(token_ids, logprobs),
                "finish_reason": finish_reason}

    def _logprobs(self, token_ids: list[int], logprobs: list[PositionLogprobs] | None) -> dict | None:
        if self.top_logprobs is None:
            return None
        content = []
        for token_id, entries in zip(token_ids, logprobs or []):
            entry = _token_entry(self.tokenizer, token_id, entries[token_id].logprob)
            entry["top_logprobs"] = [_token_entry(self.tokenizer, t, lp) for t, lp in _top(entries, self.top_logprobs)]
            content.append(entry)
        return {"content": content}


@dataclass
class CompletionFormat(OutputFormat):
    """echo: the prompt text, put before each choice's text (the first chunk of each when streaming), and with
    logprobs, the prompt's tokens before the choice's (the first prompt token has none)."""
    chunk_object: ClassVar[str] = "text_completion"
    response_object: ClassVar[str] = "text_completion"
    echo: str | None = None
    _text_offsets: dict[int, int] = field(default_factory=dict)
    _echoed: set[int] = field(default_factory=set)
    _prompt: tuple[list[int], list[PositionLogprobs | None]] | None = None

    def chunk(self, delta: RequestOutput) -> dict[str, Any] | None:
        self._keep_prompt(delta.prompt_token_ids, delta.prompt_logprobs)
        return super().chunk(delta)

    def response(self, result: Result) -> dict[str, Any]:
        self._keep_prompt(result.prompt_token_ids, result.prompt_logprobs)
        return super().response(result)

    def _keep_prompt(self, token_ids: list[int], logprobs: list[PositionLogprobs | None] | None) -> None:
        if self._prompt is None and logprobs is not None:
            self._prompt = (token_ids, logprobs)

    def choice(self, index: int, text: str, token_ids: list[int], logprobs: list[PositionLogprobs] | None,
               finish_reason: str | None, streamed: bool) -> dict[str, Any]:
        echoed = self.echo is not None and index not in self._echoed
        self._text_offsets.setdefault(index, 0)
        entries = self._logprobs(index, echoed, token_ids, logprobs)
        if echoed:
            self._echoed.add(index)
            text = self.echo + text
        return {"index": index, "text": text, "logprobs": entries, "finish_reason": finish_reason}

    def _logprobs(self, index: int, echoed: bool, token_ids: list[int],
                  logprobs: list[PositionLogprobs] | None) -> dict | None:
        if self.top_logprobs is None:
            return None
        positions = list(zip(token_ids, logprobs or []))
        if echoed and self._prompt is not None:
            positions = list(zip(*self._prompt)) + positions
        tokens, token_logprobs, tops, offsets = [], [], [], []
        for token_id, entries in positions:
            token = self.tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")
            tokens.append(token)
            known = entries is not None and token_id in entries
            token_logprobs.append(max(entries[token_id].logprob, LOGPROB_FLOOR) if known else None)
            tops.append({_token_entry(self.tokenizer, t, lp)["token"]: max(lp, LOGPROB_FLOOR)
                         for t, lp in _top(entries, self.top_logprobs)} if entries is not None else None)
            offsets.append(self._text_offsets[index])
            self._text_offsets[index] += len(token)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}
