"""The server's Prometheus metrics against vLLM's names, types and labels (the list below), read back through
prometheus-client's text-format parser; what requests add to them; the prefix and encoder caches' counters; the
--metrics-prefix and stats-log flags; vLLM's periodic stats log line. In process, on the demo model."""
from __future__ import annotations

import argparse
import asyncio
import io
import logging
import re
import time

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from conftest import TINY
from engine.async_llm import AsyncLLM
from engine.entrypoints.api_server import build_app
from engine.entrypoints.settings import ServerSettings
from engine.llm_engine import LLMEngine
from engine.metrics import (FINISH_REASONS, MetricsSettings, ServingMetrics, StatsLogger, add_metrics_cli_args,
                            metrics_settings)
from engine.sampling_params import SamplingParams

# vLLM's v1 metric families as its PrometheusStatLogger (vllm/v1/metrics/loggers.py) registers them: name, type (as
# prometheus-client's parser reports it: counters without their `_total`), and the labels besides `model_name`
# and `engine`. vLLM also exports families this engine has no counterpart of (speculative decoding, LoRA, KV
# connectors, sleep mode, corrupted requests, prompt tokens by source, KV block residency).
VLLM_METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "vllm:num_requests_running": ("gauge", ()),
    "vllm:num_requests_waiting": ("gauge", ()),
    "vllm:kv_cache_usage_perc": ("gauge", ()),
    "vllm:prefix_cache_queries": ("counter", ()),
    "vllm:prefix_cache_hits": ("counter", ()),
    "vllm:mm_cache_queries": ("counter", ()),
    "vllm:mm_cache_hits": ("counter", ()),
    "vllm:num_preemptions": ("counter", ()),
    "vllm:prompt_tokens": ("counter", ()),
    "vllm:generation_tokens": ("counter", ()),
    "vllm:request_success": ("counter", ("finished_reason",)),
    "vllm:request_prompt_tokens": ("histogram", ()),
    "vllm:request_generation_tokens": ("histogram", ()),
    "vllm:iteration_tokens_total": ("histogram", ()),
    "vllm:request_max_num_generation_tokens": ("histogram", ()),
    "vllm:request_params_n": ("histogram", ()),
    "vllm:time_to_first_token_seconds": ("histogram", ()),
    "vllm:inter_token_latency_seconds": ("histogram", ()),
    "vllm:request_time_per_output_token_seconds": ("histogram", ()),
    "vllm:e2e_request_latency_seconds": ("histogram", ()),
    "vllm:request_queue_time_seconds": ("histogram", ()),
    "vllm:request_inference_time_seconds": ("histogram", ()),
    "vllm:request_prefill_time_seconds": ("histogram", ()),
    "vllm:request_decode_time_seconds": ("histogram", ()),
    # vLLM's labels here are the cache config's fields (and engine); these are the ones this engine has
    "vllm:cache_config_info": ("gauge", ("block_size", "cache_dtype", "enable_prefix_caching", "num_gpu_blocks")),
}
OWN_LABELS = ("model_name", "engine")


def check_vllm_metrics(text: str, model_name: str, prefix: str = "vllm:") -> None:
    """Every family of VLLM_METRICS is in the exposition `text`, with its type and exactly its labels."""
    families = {family.name: family for family in text_string_to_metric_families(text)}
    for vllm_name, (kind, labels) in VLLM_METRICS.items():
        family = families.get(prefix + vllm_name.removeprefix("vllm:"))
        assert family is not None and family.type == kind and family.samples, (vllm_name, family)
        for sample in family.samples:
            expected = set(OWN_LABELS + labels) | ({"le"} if sample.name.endswith("_bucket") else set())
            assert set(sample.labels) == expected, sample
            assert (sample.labels["model_name"], sample.labels["engine"]) == (model_name, "0"), sample
    reasons = {s.labels["finished_reason"] for s in families[prefix + "request_success"].samples}
    assert reasons == set(FINISH_REASONS) == {"stop", "length", "abort", "error"}


def sample_values(text: str) -> dict[str, float]:
    """An exposition's samples by name, with their labels other than model_name and engine as `name{k="v"}`."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()) if k not in OWN_LABELS)
            found[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return found


def values(metrics: ServingMetrics) -> dict[str, float]:
    return sample_values(metrics.render()[0].decode())


def png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def llm():
    engine = AsyncLLM("demo")
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def metrics(llm) -> ServingMetrics:
    served = ServingMetrics(llm.stats, "demo-served", llm.max_model_len)
    llm.add_step_listener(served.observe_step)
    return served


async def _final(llm: AsyncLLM, prompt, params: dict, stop_after: int | None = None):
    """The request's last output; with stop_after, the caller stops iterating (an abort) after that many."""
    seen = 0
    async for out in llm.generate(prompt, params):
        seen += 1
        if seen == stop_after:
            break
    return out


def run(llm: AsyncLLM, *requests: tuple) -> list:
    async def main():
        return await asyncio.gather(*(_final(llm, *request) for request in requests))
    return asyncio.run(main())


def test_the_app_exports_vllms_metrics_with_the_served_model_name(llm):
    app = build_app(llm, ServerSettings(model_name="served-name"))

    async def get():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            return await http.get("/metrics")
    response = asyncio.run(get())
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    check_vllm_metrics(response.text, "served-name")
    assert "vllm:cogvlm2_kv_cache_free_blocks" in response.text  # this engine's own, under the same prefix


def test_requests_count_once_in_each_metric(llm, metrics):
    before = values(metrics)
    text = [(f"Say {i}.", {"max_tokens": 5, "ignore_eos": True}) for i in range(3)]
    image = ({"prompt": "How many shapes are there?", "image": str(TINY / "demo_0.png")},
             {"max_tokens": 16, "temperature": 0})
    outputs = run(llm, *text, image)
    aborted = run(llm, ("Tell me a long story.", {"max_tokens": 500, "ignore_eos": True}, 2))[0]
    failed = run(llm, ({"prompt": "x", "colour": 1}, {}))[0]
    assert [o.outputs[0].finish_reason for o in outputs] == ["length"] * 3 + ["stop"] and failed.error
    after = values(metrics)

    def grew(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    for reason, count in (("length", 3), ("stop", 1), ("abort", 1), ("error", 1)):
        assert grew(f'vllm:request_success_total{{finished_reason="{reason}"}}') == count
    for name in ("e2e_request_latency_seconds", "request_prompt_tokens", "request_generation_tokens",
                 "request_max_num_generation_tokens", "request_params_n"):
        assert grew(f"vllm:{name}_count") == 6, name  # every finished request
    assert grew("vllm:request_params_n_sum") == 6
    started = 5  # all but the failed one reached their first token
    for name in ("time_to_first_token_seconds", "request_queue_time_seconds", "request_prefill_time_seconds",
                 "request_decode_time_seconds", "request_inference_time_seconds",
                 "request_time_per_output_token_seconds"):
        assert grew(f"vllm:{name}_count") == started, name
    generated = grew("vllm:generation_tokens_total")
    answer_tokens = len(outputs[3].outputs[0].token_ids)
    assert generated >= 3 * 5 + answer_tokens + 2 and generated == grew("vllm:request_generation_tokens_sum")
    assert grew("vllm:inter_token_latency_seconds_count") == generated - started  # each token after the first
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs + [aborted])
    assert grew("vllm:prompt_tokens_total") == prompt_tokens == grew("vllm:request_prompt_tokens_sum")
    assert grew("vllm:iteration_tokens_total_sum") == prompt_tokens + generated
    # sane times: the phases add up, a request's time per output token is a fraction of its decode
    assert 0 < grew("vllm:request_prefill_time_seconds_sum") + grew("vllm:request_decode_time_seconds_sum") == \
        pytest.approx(grew("vllm:request_inference_time_seconds_sum"))
    assert grew("vllm:request_inference_time_seconds_sum") < grew("vllm:e2e_request_latency_seconds_sum")
    assert 0 < grew("vllm:request_time_per_output_token_seconds_sum") < grew("vllm:request_decode_time_seconds_sum")
    assert grew("vllm:inter_token_latency_seconds_sum") <= grew("vllm:request_decode_time_seconds_sum")
    assert after["vllm:num_requests_running"] == after["vllm:num_requests_waiting"] == 0
    assert after["vllm:kv_cache_usage_perc"] == 0


def test_prefix_and_encoder_cache_counters_move(llm, metrics):
    before = values(metrics)
    prompt = {"prompt": "What colour is the background?", "image": png((200, 30, 90))}  # an image new here
    first, second = (run(llm, (prompt, {"max_tokens": 2, "temperature": 0}))[0] for _ in range(2))
    after = values(metrics)

    def grew(name: str) -> float:
        return after[name] - before[name]

    assert grew("vllm:mm_cache_queries_total") == 2 and grew("vllm:mm_cache_hits_total") == 1  # encoded once
    assert grew("vllm:cogvlm2_images_encoded_total") == 1
    assert grew("vllm:prefix_cache_queries_total") == 2 * len(first.prompt_token_ids)
    assert grew("vllm:prefix_cache_hits_total") == second.num_cached_tokens > 0  # the image's first full blocks


def test_the_stats_line_reports_throughput_then_quiets_down(llm, metrics, caplog):
    start = time.monotonic()
    stats_logger = StatsLogger(metrics, interval=2.0)
    out = run(llm, ("Say hi.", {"max_tokens": 8, "ignore_eos": True}))[0]
    with caplog.at_level(logging.DEBUG, logger="engine.metrics"):
        for seconds in (2.0, 4.0, 6.0):
            stats_logger.log(now=start + seconds)
    busy, after_busy, idle = [r for r in caplog.records if r.name == "engine.metrics"]
    assert (busy.levelno, after_busy.levelno, idle.levelno) == (logging.INFO, logging.INFO, logging.DEBUG)
    pattern = (r"Avg prompt throughput: ([\d.]+) tokens/s, Avg generation throughput: ([\d.]+) tokens/s, "
               r"Running: (\d+) reqs, Waiting: (\d+) reqs, KV cache usage: ([\d.]+)%, "
               r"Prefix cache hit rate: ([\d.]+)%, Encoder cache hit rate: ([\d.]+)%")
    numbers = [float(x) for x in re.fullmatch(pattern, busy.getMessage()).groups()]
    assert numbers[0] == pytest.approx(len(out.prompt_token_ids) / 2, rel=0.05)
    assert numbers[1] == pytest.approx(8 / 2, rel=0.05)
    assert numbers[2:5] == [0, 0, 0.0] and 0 <= numbers[5] <= 100 and numbers[6] == 0.0  # no image looked up
    assert re.fullmatch(pattern, after_busy.getMessage()).groups()[:2] == ("0.0", "0.0")


def test_metrics_prefix_and_stats_flags(llm):
    parser = argparse.ArgumentParser()
    add_metrics_cli_args(parser)
    assert metrics_settings(parser.parse_args([])) == MetricsSettings("vllm:", True, 10.0, "info")
    args = parser.parse_args(["--metrics-prefix", "cogvlm2:", "--disable-log-stats", "--log-stats-interval", "2.5",
                              "--log-stats-level", "debug"])
    assert metrics_settings(args) == MetricsSettings("cogvlm2:", False, 2.5, "debug")
    text = ServingMetrics(llm.stats, "demo", llm.max_model_len, prefix="cogvlm2:").render()[0].decode()
    check_vllm_metrics(text, "demo", prefix="cogvlm2:")
    assert "vllm:" not in text
    for bad in ({"prefix": "my-prefix"}, {"log_stats_interval": 0}, {"log_stats_level": "loud"}):
        with pytest.raises(ValueError):
            MetricsSettings(**bad)


def test_a_chunked_prefill_looks_its_image_up_once():
    engine = LLMEngine("demo", max_num_batched_tokens=8, enable_chunked_prefill=True, enable_prefix_caching=False)
    image = {"prompt": "How many shapes are there?", "image": str(TINY / "demo_0.png")}
    for request_id in ("a", "b"):
        engine.add_request(request_id, image, SamplingParams(max_tokens=1))
        while engine.has_unfinished_requests():
            engine.step()
    stats = engine.stats()
    assert stats["num_prefill_chunks"] >= 4  # each image spans chunks
    assert (stats["encoder_cache_queries"], stats["encoder_cache_hits"], stats["num_images_encoded"]) == (2, 1, 1)
