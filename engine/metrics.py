"""The server's Prometheus metrics under vLLM's names and labels (its v1 engine's), so vLLM's Grafana dashboards
work unchanged, and vLLM's periodic stats log line.

Every series carries vLLM's labels `model_name` (the served model name) and `engine` ("0": one engine per server).
Request-level metrics (token counts, time to first token, inter-token latency, the phases of a finished request)
are observed by `ServingMetrics.observe_step`, an AsyncLLM step listener: it runs in the engine thread once per
step (prometheus-client is thread-safe). Scheduler and cache state that the engine already counts (queue lengths,
KV blocks, preemptions, prefix- and encoder-cache lookups) is read from `stats()` at scrape time instead of being
mirrored. This engine's own extras carry `cogvlm2_` after the prefix.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from engine.outputs import RequestOutput

logger = logging.getLogger(__name__)

DEFAULT_PREFIX = "vllm:"
LABELS = ("model_name", "engine")
ENGINE_INDEX = "0"
FINISH_REASONS = ("stop", "length", "abort", "error")
LOG_LEVELS = ("debug", "info", "warning")
# vLLM's bucket bounds, plus finer ones below them: a CPU engine's steps take milliseconds.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                     1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                   50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
STEP_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
N_BUCKETS = (1, 2, 5, 10, 20)


# ---- settings and flags --------------------------------------------------------------------------------------
@dataclass
class MetricsSettings:
    prefix: str = DEFAULT_PREFIX
    log_stats: bool = True
    log_stats_interval: float = 10.0  # seconds
    log_stats_level: str = "info"  # of the line while the server is busy (idle: debug, as vLLM)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", self.prefix):
            raise ValueError(f"--metrics-prefix {self.prefix!r} is not a Prometheus metric name prefix")
        if not self.log_stats_interval > 0:
            raise ValueError(f"--log-stats-interval must be > 0, got {self.log_stats_interval}")
        if self.log_stats_level not in LOG_LEVELS:
            raise ValueError(f"--log-stats-level must be one of {LOG_LEVELS}, got {self.log_stats_level!r}")


def add_metrics_cli_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("metrics and stats logging")
    group.add_argument("--metrics-prefix", default=DEFAULT_PREFIX,
                       help=f"prefix of the /metrics names (default {DEFAULT_PREFIX!r}, vLLM's)")
    group.add_argument("--disable-log-stats", action="store_true", help="no periodic throughput and cache log line")
    group.add_argument("--log-stats-interval", type=float, default=10.0, help="seconds between stats lines")
    group.add_argument("--log-stats-level", default="info", choices=LOG_LEVELS,
                       help="log level of the stats line while busy (idle: debug)")


def metrics_settings(args: argparse.Namespace) -> MetricsSettings:
    return MetricsSettings(args.metrics_prefix, not args.disable_log_stats, args.log_stats_interval,
                           args.log_stats_level)


# ---- request-level metrics -----------------------------------------------------------------------------------
@dataclass
class TokenTotals:
    """Prompt tokens of requests whose prefill finished, and generated tokens: what the stats line's throughputs
    are computed from (the Prometheus counters hold the same counts)."""
    prompt: int = 0
    generation: int = 0


@dataclass
class _Progress:
    """A request seen past its first token."""
    last_token_time: float | None
    tokens: collections.Counter = field(default_factory=collections.Counter)  # generated, by completion index


class ServingMetrics:
    """Owns its own registry, so several servers (or tests) in one process never collide."""

    def __init__(self, stats: Callable[[], dict[str, Any]], model_name: str, max_model_len: int,
                 prefix: str = DEFAULT_PREFIX):
        self.stats = stats
        self.totals = TokenTotals()
        self.registry = CollectorRegistry(auto_describe=True)
        labels = (model_name, ENGINE_INDEX)

        def counter(name: str, doc: str) -> Counter:
            return Counter(prefix + name, doc, LABELS, registry=self.registry).labels(*labels)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(prefix + name, doc, LABELS, buckets=buckets, registry=self.registry).labels(*labels)

        lengths = _one_two_five(max_model_len)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of the requests whose prefill finished.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        success = Counter(prefix + "request_success", "Finished requests, by finish reason.",
                          LABELS + ("finished_reason",), registry=self.registry)
        self.finished = {reason: success.labels(*labels, reason) for reason in FINISH_REASONS}
        self.step_tokens = histogram("iteration_tokens_total", "Prompt and generated tokens accounted per step.",
                                     STEP_TOKEN_BUCKETS)
        self.request_prompt_tokens = histogram("request_prompt_tokens", "Prompt tokens per finished request.",
                                               lengths)
        self.request_generation_tokens = histogram("request_generation_tokens",
                                                   "Generated tokens per finished request.", lengths)
        self.max_generation_tokens = histogram("request_max_num_generation_tokens",
                                               "Generated tokens of a finished request's longest completion.",
                                               lengths)
        self.params_n = histogram("request_params_n", "Completions (n) per finished request.", N_BUCKETS)
        self.ttft = histogram("time_to_first_token_seconds", "Arrival to the first sampled token.", TTFT_BUCKETS)
        self.inter_token = histogram("inter_token_latency_seconds", "Time between a request's successive tokens.",
                                     PER_TOKEN_BUCKETS)
        self.time_per_output_token = histogram("request_time_per_output_token_seconds",
                                               "A finished request's decode time per token after the first.",
                                               PER_TOKEN_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish.", REQUEST_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds", "Arrival to first scheduled (waiting).",
                                    REQUEST_BUCKETS)
        self.prefill_time = histogram("request_prefill_time_seconds", "First scheduled to first token.",
                                      REQUEST_BUCKETS)
        self.decode_time = histogram("request_decode_time_seconds", "First token to last token.", REQUEST_BUCKETS)
        self.inference_time = histogram("request_inference_time_seconds", "First scheduled to last token (running).",
                                        REQUEST_BUCKETS)
        self.registry.register(_EngineStatsCollector(stats, prefix, labels))
        self._progress: dict[str, _Progress] = {}

    def observe_step(self, outputs: list[RequestOutput], now: float) -> None:
        step_tokens = sum(self._observe(out, now) for out in outputs)
        if step_tokens:
            self.step_tokens.observe(step_tokens)

    def _observe(self, out: RequestOutput, now: float) -> int:
        """One request's delta of a step (its token ids are the ones sampled in that step); returns the prompt and
        generated tokens it accounts for."""
        m = out.metrics
        new = {c.index: len(c.token_ids) for c in out.outputs}
        num_new = sum(new.values())
        num_prompt = 0
        progress = self._progress.get(out.request_id)
        if progress is None and m.first_token_time is not None:
            self.ttft.observe(m.first_token_time - m.arrival_time)
            progress = self._progress[out.request_id] = _Progress(m.last_token_time)
            num_prompt = len(out.prompt_token_ids)
        elif progress is not None and num_new:
            previous, progress.last_token_time = progress.last_token_time, m.last_token_time
            if previous is not None and m.last_token_time is not None:
                self.inter_token.observe(m.last_token_time - previous)  # once per step, as vLLM
        if progress is not None:
            progress.tokens.update(new)
        self._count_tokens(num_prompt, num_new)
        if out.finished:
            self._observe_finished(out, self._progress.pop(out.request_id, None), now)
        return num_prompt + num_new

    def _count_tokens(self, prompt: int, generation: int) -> None:
        self.prompt_tokens.inc(prompt)
        self.generation_tokens.inc(generation)
        self.totals.prompt += prompt
        self.totals.generation += generation

    def _observe_finished(self, out: RequestOutput, progress: _Progress | None, now: float) -> None:
        m = out.metrics
        reason = out.outputs[0].finish_reason if out.outputs else None
        self.finished[reason if reason in self.finished else "error"].inc()
        tokens = progress.tokens if progress is not None else collections.Counter()
        longest = max(tokens.values(), default=0)
        self.e2e.observe(max(now - m.arrival_time, 0.0))
        self.request_prompt_tokens.observe(len(out.prompt_token_ids))
        self.request_generation_tokens.observe(sum(tokens.values()))
        self.max_generation_tokens.observe(longest)
        self.params_n.observe(max(len(tokens), 1))
        if m.first_token_time is None or m.first_scheduled_time is None:
            return  # the phases are observed for requests that reached their first token
        last_token_time = m.last_token_time or m.first_token_time
        decode = last_token_time - m.first_token_time
        self.queue_time.observe(m.first_scheduled_time - m.arrival_time)
        self.prefill_time.observe(m.first_token_time - m.first_scheduled_time)
        self.decode_time.observe(decode)
        self.inference_time.observe(last_token_time - m.first_scheduled_time)
        self.time_per_output_token.observe(decode / (longest - 1) if longest > 1 else 0.0)  # 0 as vLLM

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text exposition."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _one_two_five(limit: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `limit`."""
    bounds, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > limit:
                return tuple(bounds)
            bounds.append(mantissa * scale)
        scale *= 10


def kv_cache_usage(stats: dict[str, Any]) -> float:
    """Fraction of KV blocks in use (blocks holding only cached prefixes count as free, as in vLLM)."""
    total = stats["num_total_blocks"]
    return 1 - stats["num_free_blocks"] / total if total else 0.0


# ---- engine state, read at scrape time ----------------------------------------------------------------------
class _EngineStatsCollector:
    def __init__(self, stats: Callable[[], dict[str, Any]], prefix: str, labels: tuple[str, str]):
        self._stats = stats
        self._prefix = prefix
        self._labels = labels

    def describe(self) -> list[Metric]:
        return []  # unknown until the first scrape: skip the registry's duplicate-name check

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        if not s:
            return
        gauge, counter = self._gauge, self._counter
        yield gauge("num_requests_running", "Requests in the running batch.", s["num_running"])
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled.", s["num_waiting"])
        yield gauge("kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = all).", kv_cache_usage(s))
        yield counter("num_preemptions", "Requests preempted (KV blocks freed, recomputed later).",
                      s["num_preemptions"])
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      s["prefix_cache_queried_tokens"])
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", s["prefix_cache_hit_tokens"])
        yield counter("mm_cache_queries", "Images looked up in the encoder cache (one per image per prefill).",
                      s["encoder_cache_queries"])
        yield counter("mm_cache_hits", "Images whose vision features the encoder cache held.",
                      s["encoder_cache_hits"])
        yield self._cache_config(s)
        # this engine's own
        yield gauge("cogvlm2_kv_cache_blocks", "KV cache blocks.", s["num_total_blocks"])
        yield gauge("cogvlm2_kv_cache_free_blocks", "Free KV cache blocks (cached prefixes count as free).",
                    s["num_free_blocks"])
        yield gauge("cogvlm2_kv_cache_bytes", "KV cache size on one device.", s["kv_cache_bytes"])
        yield gauge("cogvlm2_kv_cache_used_bytes", "KV cache bytes in use on one device.", s["kv_cache_used_bytes"])
        yield counter("cogvlm2_engine_steps", "Engine steps.", s["num_steps"])
        yield counter("cogvlm2_images_encoded", "Images run through the vision encoder.", s["num_images_encoded"])

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(self._prefix + name, doc, labels=LABELS)
        family.add_metric(self._labels, value)
        return family

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(self._prefix + name, doc, labels=LABELS)
        family.add_metric(self._labels, value)
        return family

    def _cache_config(self, s: dict[str, Any]) -> GaugeMetricFamily:
        """vLLM's info gauge (always 1) of the KV cache's configuration, in its label names."""
        config = {"block_size": s["block_size"], "cache_dtype": s["kv_cache_dtype"],
                  "enable_prefix_caching": s["enable_prefix_caching"], "num_gpu_blocks": s["num_total_blocks"]}
        family = GaugeMetricFamily(self._prefix + "cache_config_info", "The KV cache's configuration.",
                                   labels=LABELS + tuple(config))
        family.add_metric(self._labels + tuple(str(v) for v in config.values()), 1)
        return family


# ---- the periodic log line ----------------------------------------------------------------------------------
@dataclass
class _Snapshot:
    time: float
    totals: TokenTotals
    prefix_queries: int
    prefix_hits: int
    mm_queries: int
    mm_hits: int


class StatsLogger:
    """vLLM's stats line every `interval` seconds: throughputs since the previous line, queue lengths, KV cache
    usage and the interval's cache hit rates. Logged at `level` while busy and on the first idle line after, at
    debug while idle (vLLM's rule: an idle server stays quiet)."""

    def __init__(self, metrics: ServingMetrics, interval: float = 10.0, level: str = "info"):
        self.metrics = metrics
        self.interval = interval
        self.level: int = getattr(logging, level.upper())
        self._last = self._snapshot(time.monotonic(), metrics.stats())
        self._was_busy = False

    def _snapshot(self, now: float, s: dict[str, Any]) -> _Snapshot:
        return _Snapshot(now, TokenTotals(self.metrics.totals.prompt, self.metrics.totals.generation),
                         s.get("prefix_cache_queried_tokens", 0), s.get("prefix_cache_hit_tokens", 0),
                         s.get("encoder_cache_queries", 0), s.get("encoder_cache_hits", 0))

    def log(self, now: float | None = None) -> None:
        s = self.metrics.stats()
        if not s:
            return  # the engine has not started
        last, new = self._last, self._snapshot(time.monotonic() if now is None else now, s)
        self._last = new
        elapsed = new.time - last.time
        prompt_rate = (new.totals.prompt - last.totals.prompt) / elapsed if elapsed > 0 else 0.0
        generation_rate = (new.totals.generation - last.totals.generation) / elapsed if elapsed > 0 else 0.0
        busy = bool(prompt_rate or generation_rate)
        level = self.level if busy or self._was_busy else logging.DEBUG
        self._was_busy = busy
        logger.log(level, "Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, "
                          "Running: %d reqs, Waiting: %d reqs, KV cache usage: %.1f%%, Prefix cache hit rate: "
                          "%.1f%%, Encoder cache hit rate: %.1f%%",
                   prompt_rate, generation_rate, s["num_running"], s["num_waiting"], 100 * kv_cache_usage(s),
                   _percent(new.prefix_hits - last.prefix_hits, new.prefix_queries - last.prefix_queries),
                   _percent(new.mm_hits - last.mm_hits, new.mm_queries - last.mm_queries))

    async def run(self) -> None:
        """Logs every interval until cancelled."""
        while True:
            await asyncio.sleep(self.interval)
            self.log()


def _percent(part: int, whole: int) -> float:
    return 100 * part / whole if whole else 0.0
