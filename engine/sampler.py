"""Batched token sampling over host (NumPy) logits.

Processing order, per row of the [B, V] float32 logits:
  0. structured outputs: a constrained row keeps only the tokens its grammar allows (engine/structured_outputs.py);
     allowed_token_ids keeps only those; bad_words bans a word's last token where the output ends with the rest of
     it (a one-token word always); logit_bias is added;
  1. repetition penalty (vLLM/CTRL style) on every token seen in prompt + output: positive logits are divided by
     the penalty, negative ones multiplied;
  2. frequency and presence penalties (OpenAI style) on output tokens only:
     logit -= frequency_penalty * count + presence_penalty * (count > 0);
  3. min_tokens: while len(output) < min_tokens, stop_token_ids and (unless ignore_eos) the EOS ids get -inf;
  -> greedy rows (temperature 0) take the argmax here (ties -> lowest id) and draw no randomness;
  4. temperature: logits / temperature;
  5. top_k: keep the tokens whose logit is >= the k-th largest (ties at the boundary are all kept);
  6. softmax, then top_p: keep the smallest most-likely set whose cumulative probability is >= top_p (again all
     tokens tied with the last one kept), computed on the distribution left by top_k;
  7. min_p: keep tokens with prob >= min_p * max prob;
  8. renormalise and draw: u = rng.random(), then inverse CDF over the kept probabilities in token-id order.

Reproducibility: each sampling row draws exactly one number from its own request's generator per step, and its
probabilities are computed row by row, so a seeded request yields the same tokens alone or in any batch.

Logprobs (params.logprobs = k): the chosen token's entry and the k most likely, each with its rank (1 = most
likely; ties by token id). Which values, per the engine's logprobs_mode (vLLM's names):
  raw_logprobs (default)  log_softmax of the model's logits, before any step above;
  raw_logits              the model's logits;
  processed_logprobs      log of the distribution the token is drawn from (after steps 0-7, renormalised; -inf
                          for the tokens truncated away); for greedy rows, log_softmax after steps 0-3;
  processed_logits        the logits at that point (scaled by temperature; -inf where truncated).
Prompt logprobs are always from the model's logits (raw): nothing processes the prompt.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.sampling_params import SamplingParams
from engine.structured_outputs import GrammarCompiler

# Top-p first looks for the nucleus among this many most likely tokens; a full sort only if that is not enough.
TOP_P_CANDIDATES = 1024
CDF_BLOCK = 256


def make_rng(seed: int | Sequence[int]) -> np.random.Generator:
    """A request's private generator. Pass params.seed, or (engine_seed, request_counter) for unseeded requests."""
    return np.random.default_rng(seed)


@dataclass
class SamplingState:
    """What the sampler needs to know about one sequence of the batch."""

    params: SamplingParams
    rng: np.random.Generator
    prompt_token_ids: np.ndarray
    output_token_ids: list[int] = field(default_factory=list)
    matcher: Any = None  # structured outputs: the request's llguidance matcher (engine/structured_outputs.py)
    bad_word_ids: list[list[int]] = field(default_factory=list)  # params.bad_words as token sequences
    _prompt_vocab: np.ndarray | None = field(default=None, init=False, repr=False)

    @classmethod
    def create(cls, params: SamplingParams, prompt_token_ids: Sequence[int] | np.ndarray,
               engine_seed: int, request_counter: int,
               output_token_ids: list[int] | None = None) -> "SamplingState":
        """`output_token_ids`: the sequence's own list (read, never copied or written here)."""
        seed = params.seed if params.seed is not None else (engine_seed, request_counter)
        return cls(params, make_rng(seed), np.asarray(prompt_token_ids, dtype=np.int64),
                   output_token_ids if output_token_ids is not None else [])

    def prompt_vocab(self, vocab_size: int) -> np.ndarray:
        """Distinct prompt ids inside the vocabulary (image placeholders may lie outside), cached."""
        if self._prompt_vocab is None:
            ids = np.unique(np.asarray(self.prompt_token_ids, dtype=np.int64))
            self._prompt_vocab = ids[(ids >= 0) & (ids < vocab_size)]
        return self._prompt_vocab


LOGPROBS_MODES = ("raw_logprobs", "raw_logits", "processed_logprobs", "processed_logits")


@dataclass
class TokenLogprobs:
    """One position's logprobs: the chosen token first (when there is one), then the top-k by rank."""
    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]


@dataclass
class SamplerOutput:
    token_ids: np.ndarray  # [B] int64
    # Per row: None if that request asked for no logprobs. None for the whole batch if no row asked.
    logprobs: list[TokenLogprobs | None] | None


class Sampler:
    def __init__(self, eos_token_ids: Sequence[int] = (), grammars: GrammarCompiler | None = None,
                 logprobs_mode: str = "raw_logprobs"):
        if logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {logprobs_mode!r}")
        self.eos_token_ids = [int(i) for i in eos_token_ids]
        self.grammars = grammars
        self.logprobs_mode = logprobs_mode

    def __call__(self, logits: np.ndarray, states: list[SamplingState]) -> SamplerOutput:
        _check_batch(logits, states)
        raw = np.asarray(logits, dtype=np.float32)
        logits = process_logits(raw, states, self.eos_token_ids, self.grammars)
        greedy = np.array([s.params.is_greedy for s in states], dtype=bool)
        token_ids = np.empty(len(states), dtype=np.int64)
        distributions: dict[int, TokenDistribution] = {}
        if greedy.all():
            token_ids[:] = logits.argmax(axis=1)
        else:
            token_ids[greedy] = logits[greedy].argmax(axis=1)
            for i in np.flatnonzero(~greedy):
                distributions[i] = filtered_distribution(logits[i], states[i].params)
                token_ids[i] = draw(distributions[i], states[i].rng)
        rows = [i for i, s in enumerate(states) if s.params.logprobs is not None]
        if not rows:
            return SamplerOutput(token_ids, None)
        logprobs: list[TokenLogprobs | None] = [None] * len(states)
        for i in rows:
            values, normalise = self._logprob_values(raw[i], logits[i], states[i].params, distributions.get(i))
            logprobs[i] = position_logprobs(values, int(token_ids[i]), states[i].params.logprobs, normalise)
        return SamplerOutput(token_ids, logprobs)

    def _logprob_values(self, raw: np.ndarray, processed: np.ndarray, params: SamplingParams,
                        distribution: TokenDistribution | None) -> tuple[np.ndarray, bool]:
        """The row the logprobs are read from under this sampler's mode, and whether to log_softmax it."""
        mode = self.logprobs_mode
        if mode.startswith("raw") or distribution is None:
            return (raw if mode.startswith("raw") else processed), mode.endswith("logprobs")
        values = np.full(processed.shape, -np.inf, dtype=np.float32)
        ids = distribution.token_ids if distribution.token_ids is not None else slice(None)
        if mode == "processed_logprobs":
            with np.errstate(divide="ignore"):
                values[ids] = np.log(distribution.probs)
        else:
            values[ids] = _finite_shape(processed / np.float32(params.temperature))[ids]
        return values, False


def compute_probs(logits: np.ndarray, states: list[SamplingState],
                  eos_token_ids: Sequence[int] = ()) -> np.ndarray:
    """[B, V] distribution each row's token is drawn from (one-hot at the argmax for greedy rows)."""
    _check_batch(logits, states)
    logits = process_logits(logits, states, eos_token_ids)
    greedy = np.array([s.params.is_greedy for s in states], dtype=bool)
    probs = np.zeros(logits.shape, dtype=np.float32)
    probs[np.flatnonzero(greedy), logits[greedy].argmax(axis=1)] = 1.0
    for i in np.flatnonzero(~greedy):
        probs[i] = filtered_distribution(logits[i], states[i].params).dense(logits.shape[1])
    return probs


def _check_batch(logits: np.ndarray, states: list[SamplingState]) -> None:
    if logits.ndim != 2 or logits.shape[0] != len(states):
        raise ValueError(f"logits must be [num_states={len(states)}, vocab], got shape {logits.shape}")


# ---- steps 0-3: token rules, penalties and the min_tokens mask (sparse: only touch the ids involved) ---------------

def process_logits(logits: np.ndarray, states: list[SamplingState], eos_token_ids: Sequence[int],
                   grammars: GrammarCompiler | None = None) -> np.ndarray:
    """Logits after the structured-output masks, penalties and the min_tokens mask; the input is never modified
    (copied only if needed)."""
    logits = np.asarray(logits, dtype=np.float32)
    needs_penalty = [_has_penalties(s.params) for s in states]
    needs_mask = [len(s.output_token_ids) < s.params.min_tokens for s in states]
    constrained = [i for i, s in enumerate(states) if s.matcher is not None]
    filtered = [i for i, s in enumerate(states) if _has_token_filters(s)]
    if not any(needs_penalty) and not any(needs_mask) and not constrained and not filtered:
        return logits
    logits = logits.copy()  # C-contiguous: the masks write whole rows
    if constrained:
        if grammars is None:
            raise ValueError("a constrained request reached a sampler without a grammar compiler")
        grammars.apply_masks(logits, constrained, [states[i].matcher for i in constrained])
    for i in filtered:
        _apply_token_filters(logits[i], states[i])
    _apply_repetition_penalty(logits, states)
    _apply_frequency_presence_penalties(logits, states)
    _mask_stop_ids(logits, states, eos_token_ids)
    return logits


def _has_token_filters(s: SamplingState) -> bool:
    p = s.params
    return p.allowed_token_ids is not None or p.logit_bias is not None or bool(s.bad_word_ids)


def _apply_token_filters(row: np.ndarray, s: SamplingState) -> None:
    """Step 0's per-request token rules on one row, in place."""
    p, vocab = s.params, row.shape[0]
    if p.allowed_token_ids is not None:
        allowed = np.asarray([t for t in p.allowed_token_ids if t < vocab], np.int64)
        kept = row[allowed]
        row[:] = -np.inf
        row[allowed] = kept
    for word in s.bad_word_ids:
        prefix = word[:-1]
        if len(s.output_token_ids) >= len(prefix) and s.output_token_ids[len(s.output_token_ids) - len(prefix):] \
                == prefix and word[-1] < vocab:
            row[word[-1]] = -np.inf
    if p.logit_bias is not None:
        ids = np.fromiter((t for t in p.logit_bias if t < vocab), np.int64)
        row[ids] += np.fromiter((p.logit_bias[t] for t in ids.tolist()), np.float32, len(ids))


def _has_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _flat_ids(logits: np.ndarray, rows: list[int], ids_per_row: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(row, token) pairs of many rows as two flat index arrays."""
    vocab = logits.shape[1]
    row_idx = np.concatenate([np.full(len(ids), r, dtype=np.int64) for r, ids in zip(rows, ids_per_row)])
    tok_idx = np.concatenate(ids_per_row).astype(np.int64)
    inside = (tok_idx >= 0) & (tok_idx < vocab)
    return row_idx[inside], tok_idx[inside]


def _apply_repetition_penalty(logits: np.ndarray, states: list[SamplingState]) -> None:
    rows = [i for i, s in enumerate(states) if s.params.repetition_penalty != 1.0]
    if not rows:
        return
    vocab = logits.shape[1]
    seen = [np.concatenate([states[i].prompt_vocab(vocab), np.asarray(states[i].output_token_ids, dtype=np.int64)])
            for i in rows]
    r, t = _flat_ids(logits, rows, seen)
    # Each seen token is penalised once, however often it occurred.
    flat = np.unique(r * vocab + t)
    r, t = np.divmod(flat, vocab)
    penalty = np.array([s.params.repetition_penalty for s in states], dtype=np.float32)[r]
    values = logits[r, t]
    with np.errstate(over="ignore"):  # extreme penalties overflow to +-inf, which the draw handles
        logits[r, t] = np.where(values > 0, values / penalty, values * penalty)


def _apply_frequency_presence_penalties(logits: np.ndarray, states: list[SamplingState]) -> None:
    rows = [i for i, s in enumerate(states)
            if (s.params.presence_penalty != 0.0 or s.params.frequency_penalty != 0.0) and s.output_token_ids]
    if not rows:
        return
    vocab = logits.shape[1]
    r, t = _flat_ids(logits, rows, [np.asarray(states[i].output_token_ids, dtype=np.int64) for i in rows])
    flat, counts = np.unique(r * vocab + t, return_counts=True)
    r, t = np.divmod(flat, vocab)
    frequency = np.array([s.params.frequency_penalty for s in states], dtype=np.float32)[r]
    presence = np.array([s.params.presence_penalty for s in states], dtype=np.float32)[r]
    logits[r, t] -= frequency * counts.astype(np.float32) + presence


def _mask_stop_ids(logits: np.ndarray, states: list[SamplingState], eos_token_ids: Sequence[int]) -> None:
    rows = [i for i, s in enumerate(states) if len(s.output_token_ids) < s.params.min_tokens]
    if not rows:
        return
    blocked = [np.array(states[i].params.stop_token_ids + ([] if states[i].params.ignore_eos else list(eos_token_ids)),
                        dtype=np.int64) for i in rows]
    r, t = _flat_ids(logits, rows, blocked)
    logits[r, t] = -np.inf


# ---- steps 4-8: temperature, truncation and the draw, for sampling (non-greedy) rows ---------------------------------
# These run row by row: each row keeps a different number of tokens, and computing a row on its own keeps it
# bit-identical whatever else is in the batch. Every step is still vectorised over the vocabulary.

@dataclass
class TokenDistribution:
    """A row's filtered distribution: probs over token_ids (ascending), or over the whole vocabulary if None."""

    token_ids: np.ndarray | None
    probs: np.ndarray  # float32, sums to 1

    def dense(self, vocab_size: int) -> np.ndarray:
        if self.token_ids is None:
            return self.probs
        probs = np.zeros(vocab_size, dtype=np.float32)
        probs[self.token_ids] = self.probs
        return probs


def filtered_distribution(logits: np.ndarray, params: SamplingParams) -> TokenDistribution:
    """Steps 4-7 on one row of processed logits."""
    with np.errstate(over="ignore"):
        x = _finite_shape(logits / np.float32(params.temperature))
    ids = _top_k_ids(x, params.top_k)
    probs = _softmax(x if ids is None else x[ids])
    keep_from = max(_top_p_threshold(probs, params.top_p), params.min_p * float(probs.max()))
    if keep_from > 0.0:
        kept = np.flatnonzero(probs >= np.float32(keep_from))
        ids = kept if ids is None else ids[kept]
        probs = probs[kept]
        probs /= probs.sum()
    return TokenDistribution(ids, probs)


def _finite_shape(x: np.ndarray) -> np.ndarray:
    """A row whose maximum overflowed (a penalty or the temperature pushed logits to +inf) gives the +inf tokens
    equal chances; a row with no finite logit at all, every token. Otherwise the row as it is."""
    top = x.max()
    if np.isfinite(top):
        return x
    if top == np.inf:
        return np.where(x == np.inf, np.float32(0), np.float32(-np.inf))
    return np.zeros_like(x)


def draw(distribution: TokenDistribution, rng: np.random.Generator) -> int:
    """Step 8: inverse CDF in token-id order, with exactly one rng.random() call."""
    index = _inverse_cdf(distribution.probs, rng.random())
    return index if distribution.token_ids is None else int(distribution.token_ids[index])


def _top_k_ids(x: np.ndarray, top_k: int) -> np.ndarray | None:
    """Ascending ids of the tokens whose logit is >= the k-th largest; None when top-k is off."""
    if not 0 < top_k < x.size:
        return None
    return np.flatnonzero(x >= _kth_largest(x, top_k))


def _kth_largest(x: np.ndarray, k: int) -> np.floating:
    # The k-th largest of a strided sample is a lower bound of the row's k-th largest; selecting exactly among the
    # ~k * stride values above that bound is far cheaper than partitioning the whole 128k vocabulary. The stride
    # balances the two selections (V / stride + k * stride); the sample always holds >= k values.
    stride = math.isqrt(x.size // k)
    if stride > 1:
        sample = x[::stride]
        x = x[x >= np.partition(sample, sample.size - k)[sample.size - k]]
    return np.partition(x, x.size - k)[x.size - k]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _top_p_threshold(probs: np.ndarray, top_p: float) -> float:
    """Smallest probability inside the nucleus (0 = keep all)."""
    if top_p >= 1.0:
        return 0.0
    candidates = TOP_P_CANDIDATES
    while candidates < probs.size:  # widen the candidates while they hold less than top_p (flat distributions)
        threshold = _nucleus_threshold(probs[probs >= _kth_largest(probs, candidates)], top_p)
        if threshold is not None:
            return threshold
        candidates *= 8
    threshold = _nucleus_threshold(probs, top_p)
    return 0.0 if threshold is None else threshold  # None only by rounding with top_p ~ 1: keep all


def _nucleus_threshold(largest: np.ndarray, top_p: float) -> float | None:
    """Nucleus threshold among the most likely tokens `largest`; None if they hold less than top_p."""
    descending = -np.sort(-largest)
    reached = np.flatnonzero(np.cumsum(descending, dtype=np.float64) >= top_p)
    return float(descending[reached[0]]) if reached.size else None


def _inverse_cdf(probs: np.ndarray, u: float) -> int:
    """Index i with cdf[i-1] <= u * total < cdf[i]; two levels (block sums, then one block) instead of a 128k cumsum."""
    starts = np.arange(0, probs.size, CDF_BLOCK)
    block_sums = np.add.reduceat(probs, starts, dtype=np.float64)
    block_cdf = np.cumsum(block_sums)
    target = u * block_cdf[-1]
    block = int(np.searchsorted(block_cdf, target, side="right"))
    if block >= starts.size:  # u * total rounded up to total: the last block with mass
        block = int(np.flatnonzero(block_sums)[-1])
    target -= block_cdf[block - 1] if block else 0.0
    inner = probs[starts[block]:starts[block] + CDF_BLOCK]
    index = int(np.searchsorted(np.cumsum(inner, dtype=np.float64), target, side="right"))
    if index >= inner.size:
        index = int(np.flatnonzero(inner)[-1])
    return int(starts[block]) + index


# ---- logprobs ------------------------------------------------------------------------------------------------------

def position_logprobs(values: np.ndarray, chosen: int | None, k: int, normalise: bool) -> TokenLogprobs:
    """The entries of one position: `chosen` (if any) with its rank, then the k largest values (k = -1: all).
    normalise: the values are logits, reported as log_softmax."""
    if normalise:
        values = values - np.float32(_logsumexp(values))
    top = _top_ids(values, values.size if k == -1 else k).tolist()
    ids, ranks = list(top), list(range(1, len(top) + 1))
    if chosen is not None and chosen not in top:
        ids.insert(0, chosen)
        ranks.insert(0, 1 + int(np.count_nonzero(values > values[chosen])))
    elif chosen is not None:  # move it to the front, keeping its rank
        at = top.index(chosen)
        ids.insert(0, ids.pop(at))
        ranks.insert(0, ranks.pop(at))
    return TokenLogprobs(ids, values[ids].tolist(), ranks)


def _logsumexp(x: np.ndarray) -> float:
    top = x.max()
    return float(top + np.log(np.exp(x - top).sum()))


def _top_ids(values: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k largest values, by descending value then ascending id."""
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    k = min(k, values.size)
    candidates = np.flatnonzero(values >= _kth_largest(values, k))  # ties at the boundary included, then cut by id
    order = np.lexsort((candidates, -values[candidates]))
    return candidates[order][:k]
