"""Incremental detokenisation with stop strings, for streaming.

Guarantees, for every sequence of add_token calls followed (if no stop string matched) by flush():
  * a delta never ends in the middle of a UTF-8 character: incomplete bytes wait for the next token;
  * a delta never contains a stop string, nor the beginning of one that a later token completes: text that could
    still grow into a stop string is held back until it cannot;
  * the concatenation of all deltas equals `text`, which once finished is the whole output cut just before the
    earliest stop string match (or just after it with include_stop_str_in_output).
"""
from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import Protocol


class TokenizerLike(Protocol):
    def token_bytes(self, token_id: int) -> bytes: ...

    def is_special(self, token_id: int) -> bool: ...


@dataclass
class DetokenizerUpdate:
    new_text: str  # safe to emit now
    stopped: bool = False  # a stop string matched; add no more tokens
    stop_reason: str | None = None  # the matched stop string


class IncrementalDetokenizer:
    def __init__(self, tokenizer: TokenizerLike, skip_special_tokens: bool = True, stop: list[str] | None = None,
                 include_stop_str_in_output: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = list(stop or [])
        self.include_stop_str_in_output = include_stop_str_in_output
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._decoded = ""  # all text decoded so far (the emitted part is a prefix of it)
        self._num_emitted = 0
        self.stopped = False
        self.stop_reason: str | None = None
        self.finished = False

    @property
    def text(self) -> str:
        """The text emitted so far (the concatenation of all deltas); the final output once stopped or flushed."""
        return self._decoded[:self._num_emitted]

    def add_token(self, token_id: int) -> DetokenizerUpdate:
        if self.finished:
            return DetokenizerUpdate("", self.stopped, self.stop_reason)
        skip = self.skip_special_tokens and self.tokenizer.is_special(token_id)
        data = b"" if skip else self.tokenizer.token_bytes(token_id)
        return self._append(self._utf8.decode(data, final=False), final=False)

    def flush(self) -> str:
        """Decode leftover bytes (errors='replace') and emit everything still held back; call when finishing."""
        if self.finished:
            return ""
        return self._append(self._utf8.decode(b"", final=True), final=True).new_text

    def _append(self, new: str, final: bool) -> DetokenizerUpdate:
        self._decoded += new
        match = self._find_stop()
        if match is not None:
            start, stop = match
            self._decoded = self._decoded[:start + (len(stop) if self.include_stop_str_in_output else 0)]
            self.stopped, self.stop_reason = True, stop
            return self._emit(len(self._decoded), finished=True)
        end = len(self._decoded) if final else len(self._decoded) - self._partial_stop_len()
        return self._emit(end, finished=final)

    def _emit(self, end: int, finished: bool) -> DetokenizerUpdate:
        delta = self._decoded[self._num_emitted:end]
        self._num_emitted = max(self._num_emitted, end)
        self.finished = finished
        return DetokenizerUpdate(delta, self.stopped, self.stop_reason)

    def _find_stop(self) -> tuple[int, str] | None:
        """Earliest (start, stop string) in the unemitted text; at equal starts the first listed wins."""
        # Nothing emitted can start a match: the held-back tail always covers any partial stop string.
        best: tuple[int, str] | None = None
        for stop in self.stop:
            start = self._decoded.find(stop, self._num_emitted)
            if start >= 0 and (best is None or start < best[0]):
                best = (start, stop)
        return best

    def _partial_stop_len(self) -> int:
        """Length of the longest unemitted suffix that is a proper prefix of some stop string."""
        pending = self._decoded[self._num_emitted:]
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(pending)), longest, -1):
                if pending.endswith(stop[:n]):
                    longest = n
                    break
        return longest
