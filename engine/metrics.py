"""Prometheus metrics of a serving engine: per-step latency histograms and counters, plus engine stats on scrape.

`ServingMetrics.observe_step` is an AsyncLLM step listener (it runs in the engine thread; prometheus-client is
thread-safe). Gauges and cumulative counters that the engine already keeps (KV blocks, queue lengths, preemptions,
prefix-cache tokens) are read from `stats()` at scrape time instead of being mirrored.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from engine.outputs import RequestOutput

PREFIX = "cogvlm2_"
FINISH_REASONS = ("stop", "length", "abort", "error")
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)


@dataclass
class _Progress:
    num_tokens: int
    last_token_time: float


class ServingMetrics:
    """Owns its own registry, so several servers (or tests) in one process never collide."""

    def __init__(self, stats: Callable[[], dict[str, Any]]):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Arrival to first generated token.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.inter_token = Histogram(PREFIX + "inter_token_latency_seconds", "Time between consecutive tokens.",
                                     buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Arrival to finish.", buckets=E2E_BUCKETS,
                             registry=r)
        self.finished = Counter(PREFIX + "requests_finished", "Finished requests by finish reason.",
                                ["finish_reason"], registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Generated tokens.", registry=r)
        for reason in FINISH_REASONS:
            self.finished.labels(reason)
        r.register(_EngineStatsCollector(stats))
        self._progress: dict[str, _Progress] = {}

    def observe_step(self, outputs: list[RequestOutput], now: float) -> None:
        for out in outputs:
            self._observe(out, now)

    def _observe(self, out: RequestOutput, now: float) -> None:
        """`out` is a step's delta: its token ids are the ones generated in that step."""
        num_new = len(out.outputs[0].token_ids) if out.outputs else 0
        progress = self._progress.get(out.request_id)
        first_token_time = out.metrics.first_token_time
        if progress is None and first_token_time is not None:
            self.ttft.observe(first_token_time - out.metrics.arrival_time)
            progress = self._progress[out.request_id] = _Progress(num_new, first_token_time)
            self.generation_tokens.inc(num_new)
        elif progress is not None and num_new > 0:
            # One token per step today; spread the gap if a step ever yields several.
            gap = (now - progress.last_token_time) / num_new
            for _ in range(num_new):
                self.inter_token.observe(gap)
            self.generation_tokens.inc(num_new)
            progress.num_tokens, progress.last_token_time = progress.num_tokens + num_new, now
        if out.finished:
            self._observe_finish(out, now)

    def _observe_finish(self, out: RequestOutput, now: float) -> None:
        self._progress.pop(out.request_id, None)
        reason = out.outputs[0].finish_reason if out.outputs else None
        self.finished.labels(reason or "error").inc()
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        self.e2e.observe(max(0.0, (out.metrics.finished_time or now) - out.metrics.arrival_time))

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text exposition."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _EngineStatsCollector:
    """Reads the engine's stats() snapshot on every scrape."""

    def __init__(self, stats: Callable[[], dict[str, Any]]):
        self._stats = stats

    def describe(self) -> list[Metric]:
        return []  # unknown until the first scrape: skip the registry's duplicate-name check

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        if not s:
            return
        total, free = s["num_total_blocks"], s["num_free_blocks"]
        queried, hits = s["prefix_cache_queried_tokens"], s["prefix_cache_hit_tokens"]
        yield _gauge("num_requests_running", "Requests in the running batch.", s["num_running"])
        yield _gauge("num_requests_waiting", "Requests waiting to be scheduled.", s["num_waiting"])
        yield _gauge("kv_cache_total_blocks", "KV cache blocks.", total)
        yield _gauge("kv_cache_free_blocks", "Free KV cache blocks (cached prefixes count as free).", free)
        yield _gauge("kv_cache_usage_ratio", "Fraction of KV cache blocks in use.", 1 - free / total if total else 0)
        yield _gauge("prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / tokens looked up.",
                     hits / queried if queried else 0.0)
        yield _counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", queried)
        yield _counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", hits)
        yield _counter("num_preemptions", "Requests preempted (KV blocks freed, recomputed later).",
                       s["num_preemptions"])
        yield _counter("engine_steps", "Engine steps.", s.get("num_steps", 0))


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, doc, value=value)
