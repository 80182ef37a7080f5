"""Per-request sampling parameters, with vLLM's names and semantics."""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from numbers import Integral, Real

from engine.structured_outputs import StructuredOutputsParams

# Temperatures below this are treated as greedy: dividing logits by ~0 only overflows.
GREEDY_TEMPERATURE_EPS = 1e-5
# The sampler computes in float32: every number must be one, and a repetition penalty must not round to 0.
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 1.1754943508222875e-38


class RequestOutputKind(enum.Enum):
    """What AsyncLLM.generate yields per request (vLLM's names): the whole output so far (CUMULATIVE), only what
    is new since the previous yield (DELTA), or just the finished output (FINAL_ONLY)."""
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class SamplingParams:
    """How to pick the generated tokens of one request.

    temperature 0 means greedy (argmax). top_k 0 or -1 means no top-k. max_tokens None means "up to the model's
    context length". stop is normalised to a list of strings and stop_token_ids to a list of ints.
    logprobs=k asks for the sampled token's logprob plus the k most likely tokens (see engine.sampler);
    prompt_logprobs=k the same for every prompt token. -1 means the whole vocabulary; the engine caps both at its
    max_logprobs. n copies of the request share the prompt's KV; copy i draws with seed + i when seed is set.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    n: int = 1
    structured_outputs: StructuredOutputsParams | dict | None = None  # engine/structured_outputs.py
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100] (OpenAI's range)
    allowed_token_ids: list[int] | None = None  # only these tokens can be generated
    bad_words: list[str] | None = None  # never generated (as vLLM: the word alone and after a space)
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE  # AsyncLLM's yields (LLMEngine.step: deltas)

    def __post_init__(self) -> None:
        self._check_floats()
        self._check_ints()
        self._check_bools()
        self.stop = _normalise_stop(self.stop)
        self.stop_token_ids = _normalise_stop_token_ids(self.stop_token_ids)
        self.structured_outputs = StructuredOutputsParams.of(self.structured_outputs)
        self.logit_bias = _normalise_logit_bias(self.logit_bias)
        self.allowed_token_ids = _normalise_token_list("allowed_token_ids", self.allowed_token_ids)
        self.bad_words = _normalise_bad_words(self.bad_words)
        _require(isinstance(self.output_kind, RequestOutputKind),
                 f"output_kind must be a RequestOutputKind, got {self.output_kind!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_EPS

    def _check_floats(self) -> None:
        self.temperature = _real("temperature", self.temperature)
        self.top_p = _real("top_p", self.top_p)
        self.min_p = _real("min_p", self.min_p)
        self.repetition_penalty = _real("repetition_penalty", self.repetition_penalty)
        self.presence_penalty = _real("presence_penalty", self.presence_penalty)
        self.frequency_penalty = _real("frequency_penalty", self.frequency_penalty)
        _require(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        _require(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        _require(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        _require(self.repetition_penalty >= FLOAT32_TINY,
                 f"repetition_penalty must be > 0 (at least {FLOAT32_TINY:.3g}), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _require(-2 <= value <= 2, f"{name} must be in [-2, 2], got {value}")

    def _check_ints(self) -> None:
        self.top_k = _int("top_k", self.top_k)
        self.min_tokens = _int("min_tokens", self.min_tokens)
        self.n = _int("n", self.n)
        _require(self.top_k >= -1, f"top_k must be -1, 0 (off) or a positive int, got {self.top_k}")
        _require(self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}")
        _require(self.n >= 1, f"n must be >= 1, got {self.n}")
        if self.max_tokens is not None:
            self.max_tokens = _int("max_tokens", self.max_tokens)
            _require(self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}")
            _require(self.min_tokens <= self.max_tokens,
                     f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        if self.seed is not None:
            self.seed = _int("seed", self.seed)
            _require(self.seed >= 0, f"seed must be an int >= 0, got {self.seed}")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                setattr(self, name, _int(name, getattr(self, name)))
                _require(getattr(self, name) >= -1,
                         f"{name} must be >= 0, or -1 for the whole vocabulary, got {getattr(self, name)}")

    def _check_bools(self) -> None:
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            value = getattr(self, name)
            _require(isinstance(value, bool), f"{name} must be a bool, got {type(value).__name__} {value!r}")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _real(name: str, value: object) -> float:
    # bool is an int subclass: temperature=True is almost certainly a mistake.
    _require(isinstance(value, Real) and not isinstance(value, bool),
             f"{name} must be a number, got {type(value).__name__} {value!r}")
    try:
        value = float(value)
    except OverflowError:
        value = math.inf
    _require(math.isfinite(value) and abs(value) <= FLOAT32_MAX,
             f"{name} must be finite (within float32's range), got {value}")
    return value


def _int(name: str, value: object) -> int:
    _require(isinstance(value, Integral) and not isinstance(value, bool),
             f"{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def _normalise_stop(stop: object) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    _require(isinstance(stop, (list, tuple)), f"stop must be a str or a list of str, got {type(stop).__name__}")
    for s in stop:
        _require(isinstance(s, str) and s != "", f"stop strings must be non-empty str, got {s!r}")
    return list(stop)


def _token_id(name: str, value: object) -> int:
    if isinstance(value, str) and value.isdigit():  # JSON object keys are strings (OpenAI's logit_bias)
        value = int(value)
    _require(isinstance(value, Integral) and not isinstance(value, bool) and value >= 0,
             f"{name} must hold token ids (ints >= 0), got {value!r}")
    return int(value)


def _normalise_logit_bias(bias: object) -> dict[int, float] | None:
    if bias is None:
        return None
    _require(isinstance(bias, dict), f"logit_bias must be a dict of token id -> bias, got {type(bias).__name__}")
    out = {}
    for token, value in bias.items():
        value = _real("logit_bias", value)
        _require(-100 <= value <= 100, f"logit_bias values must be in [-100, 100], got {value}")
        out[_token_id("logit_bias", token)] = value
    return out or None


def _normalise_token_list(name: str, ids: object) -> list[int] | None:
    if ids is None:
        return None
    _require(isinstance(ids, (list, tuple)) and len(ids) > 0, f"{name} must be a non-empty list of token ids")
    return [_token_id(name, i) for i in ids]


def _normalise_bad_words(words: object) -> list[str] | None:
    if words is None:
        return None
    _require(isinstance(words, (list, tuple)) and all(isinstance(w, str) and w.strip() for w in words),
             f"bad_words must be a list of non-empty str, got {words!r}")
    return list(words) or None


def _normalise_stop_token_ids(ids: object) -> list[int]:
    if ids is None:
        return []
    _require(isinstance(ids, (list, tuple)), f"stop_token_ids must be a list of int, got {type(ids).__name__}")
    out = []
    for i in ids:
        _require(isinstance(i, Integral) and not isinstance(i, bool) and i >= 0,
                 f"stop_token_ids must be ints >= 0, got {i!r}")
        out.append(int(i))
    return out
