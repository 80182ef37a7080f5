"""Structured outputs: decoding constrained to a JSON schema, a regex, a choice of strings or a grammar, with
llguidance (Rust, no Python dependencies) over the Llama-3 tokenizer's byte-level vocabulary.

A request's `StructuredOutputsParams` (vLLM's names) is compiled at admission into a grammar (llguidance's own
format; an invalid schema or regex fails that request alone, with an error naming the field) and a matcher, the
per-request state. Each step the sampler asks every constrained request's matcher for its allowed tokens (one
bitmask row each, filled in parallel) and sets the others' logits to -inf before temperature, top-k and top-p; the
engine then feeds the sampled token to the matcher and finishes the request with "stop" once the grammar is
complete. Compiled grammars are cached by their spec, so a schema sent by many requests is compiled once.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

FIELDS = ("json", "regex", "choice", "grammar", "json_object")
GRAMMAR_CACHE_SIZE = 256
# JSON is written compactly (", " and ": " between items, no other whitespace): free whitespace lets a model loop
# on it until max_tokens (measured: the demo model does), as vLLM's disable_any_whitespace option avoids. A
# schema's own "x-guidance" settings take precedence.
JSON_FORMAT = {"whitespace_flexible": False}


@dataclass
class StructuredOutputsParams:
    """Exactly one constraint: `json` (a JSON schema, as a dict or its JSON text), `regex`, `choice` (one of these
    strings), `grammar` (a Lark grammar in llguidance's dialect) or `json_object=True` (any JSON object)."""
    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        chosen = [name for name in FIELDS if getattr(self, name) not in (None, False)]
        _require(len(chosen) == 1, f"structured_outputs must set exactly one of {list(FIELDS)}, got {chosen or 'none'}")
        if self.json is not None:
            self.json = _schema(self.json)
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            _require(value is None or (isinstance(value, str) and value != ""),
                     f"structured_outputs.{name} must be a non-empty str, got {type(value).__name__}")
        if self.choice is not None:
            _require(isinstance(self.choice, (list, tuple)) and len(self.choice) > 0 and
                     all(isinstance(c, str) and c for c in self.choice),
                     f"structured_outputs.choice must be a non-empty list of non-empty str, got {self.choice!r}")
            self.choice = list(self.choice)
        _require(self.json_object in (None, True, False),
                 f"structured_outputs.json_object must be a bool, got {self.json_object!r}")

    @classmethod
    def of(cls, value: "StructuredOutputsParams | dict | None") -> "StructuredOutputsParams | None":
        if value is None or isinstance(value, StructuredOutputsParams):
            return value
        _require(isinstance(value, dict), f"structured_outputs must be a dict or StructuredOutputsParams, got "
                                          f"{type(value).__name__}")
        unknown = set(value) - set(FIELDS)
        _require(not unknown, f"structured_outputs has unknown keys {sorted(unknown)}; allowed: {list(FIELDS)}")
        return cls(**value)

    @property
    def kind(self) -> str:
        return next(name for name in FIELDS if getattr(self, name) not in (None, False))

    def key(self) -> tuple[str, str]:
        """What identifies the compiled grammar."""
        value = getattr(self, self.kind)
        return self.kind, json.dumps(value, sort_keys=True) if not isinstance(value, str) else value


def _schema(value: Any) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from e
    _require(isinstance(value, dict), f"structured_outputs.json must be a JSON schema object, got "
                                      f"{type(value).__name__}")
    return value


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


class GrammarCompiler:
    """Grammars and matchers for one tokenizer. The llguidance tokenizer (~1 s to build from the 128k vocabulary) is
    made on first use; grammars are validated once per spec and kept (LRU)."""

    def __init__(self, encoding: Any, vocab_size: int, eos_token_ids: Sequence[int]):
        self._encoding, self.vocab_size, self._eos = encoding, vocab_size, list(eos_token_ids)
        self._tokenizer = None
        self._grammars: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._lock = threading.Lock()
        self._executor = None

    @property
    def tokenizer(self):
        with self._lock:
            if self._tokenizer is None:
                import llguidance
                from llguidance.tiktoken import lltokenizer_from_encoding
                self._tokenizer = lltokenizer_from_encoding(self._encoding, n_vocab=self.vocab_size,
                                                            eos_token=self._eos)
                self._executor = llguidance.LLExecutor()
            return self._tokenizer

    def matcher(self, params: StructuredOutputsParams):
        """A fresh matcher for one request; ValueError naming the field for a spec llguidance rejects."""
        import llguidance
        grammar = self._grammar(params)
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"structured_outputs.{params.kind} cannot be used: {matcher.get_error()}")
        return matcher

    def validate(self, params: StructuredOutputsParams) -> None:
        """ValueError naming the field if llguidance rejects the spec (the compiled grammar is then cached)."""
        self._grammar(params)

    def _grammar(self, params: StructuredOutputsParams) -> str:
        key = params.key()
        with self._lock:
            if key in self._grammars:
                self._grammars.move_to_end(key)
                return self._grammars[key]
        grammar = _to_grammar(params)
        error = self._validate(grammar)
        if error:
            raise ValueError(f"structured_outputs.{params.kind} is invalid: {error.strip()}")
        with self._lock:
            self._grammars[key] = grammar
            while len(self._grammars) > GRAMMAR_CACHE_SIZE:
                self._grammars.popitem(last=False)
        return grammar

    def _validate(self, grammar: str) -> str:
        import llguidance
        return llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)

    def apply_masks(self, logits: np.ndarray, rows: list[int], matchers: list) -> None:
        """logits[rows] (in place) keep only the tokens each row's matcher allows (matchers made by `matcher`, which
        also made the executor)."""
        import llguidance.numpy as llg_numpy
        mask = llg_numpy.allocate_token_bitmask(len(rows), self.vocab_size)
        llg_numpy.fill_next_token_bitmask_par(self._executor, [(m, i) for i, m in enumerate(matchers)], mask)
        for i, row in enumerate(rows):
            llg_numpy.apply_token_bitmask_inplace(logits[row:row + 1], mask[i:i + 1])


def _to_grammar(params: StructuredOutputsParams) -> str:
    import llguidance
    kind = params.kind
    try:
        if kind == "json":
            return llguidance.LLMatcher.grammar_from_json_schema(params.json, defaults=JSON_FORMAT)
        if kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_FORMAT)
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(params.regex)
        if kind == "choice":
            return llguidance.LLMatcher.grammar_from_regex("|".join(_regex_literal(c) for c in params.choice))
        return llguidance.LLMatcher.grammar_from_lark(params.grammar)
    except Exception as e:  # noqa: BLE001  (llguidance raises its own error types)
        raise ValueError(f"structured_outputs.{kind} is invalid: {e}") from e


def _regex_literal(text: str) -> str:
    """text as a regex matching exactly it (llguidance's regex syntax is Rust's)."""
    return "".join("\\" + ch if ch in r"\.+*?()|[]{}^$#&-~" else ch for ch in text)
