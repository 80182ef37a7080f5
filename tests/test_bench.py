"""`cogvlm2 bench throughput | latency | serve` (engine/bench/): flags and defaults, the datasets' determinism and
lengths, the statistics against NumPy, Poisson arrivals, and each command run for real on the tiny model."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.bench.datasets import DEFAULT_INPUT_RANGE, DEFAULT_OUTPUT_RANGE, WORDS, sample_requests
from engine.bench.results import distribution, parse_percentiles
from engine.bench.serve import (RequestResult, arrival_offsets, calculate_metrics, format_result_block,
                                metric_samples, parse_metric_names)
from engine.cli import main, parse_args

REPO = Path(__file__).resolve().parents[1]


def _dataset_args(*flags: str):
    return parse_args(["bench", "serve", *flags])


# ---- flags -------------------------------------------------------------------------------------------------------
def test_serve_flags_and_defaults_are_vllms():
    args = parse_args(["bench", "serve"])
    assert (args.dataset_name, args.request_rate, args.burstiness, args.max_concurrency) == ("random", math.inf,
                                                                                               1.0, None)
    assert (args.host, args.port, args.base_url, args.endpoint, args.model) == ("127.0.0.1", 8000, None, None, None)
    assert (args.percentile_metrics, args.metric_percentiles, args.seed) == ("ttft,tpot,itl", "99", 0)
    assert (args.save_result, args.result_dir, args.result_filename, args.ignore_eos) == (False, None, None, False)
    args = parse_args(["bench", "serve", "--random-input-len", "7", "--random-output-len", "5", "--request-rate",
                       "8", "--max-concurrency", "4", "--num-prompts", "64"])
    assert (args.input_len, args.output_len, args.request_rate, args.max_concurrency, args.num_prompts) == \
           (7, 5, 8.0, 4, 64)


def test_throughput_and_latency_take_the_engine_flags():
    args = parse_args(["bench", "throughput", "--model", "tiny", "--seed", "3", "--max-num-seqs", "4",
                       "--input-len", "10", "--output-json", "out.json"])
    assert (args.model, args.seed, args.max_num_seqs, args.input_len, args.output_json) == \
           ("tiny", 3, 4, 10, "out.json")
    args = parse_args(["bench", "latency"])
    assert (args.input_len, args.output_len, args.batch_size, args.num_iters_warmup, args.num_iters) == \
           (32, 128, 8, 10, 30)


def test_bad_metric_names_and_percentiles_are_refused():
    assert parse_metric_names("ttft, itl,e2el") == ["ttft", "itl", "e2el"]
    assert parse_percentiles("50,99.9") == (50.0, 99.9)
    with pytest.raises(ValueError, match="latency"):
        parse_metric_names("ttft,latency")
    with pytest.raises(ValueError, match="metric-percentiles"):
        parse_percentiles("50,101")


# ---- datasets ----------------------------------------------------------------------------------------------------
def test_random_dataset_is_seeded_and_has_the_asked_lengths():
    from cogvlm2.tokenizer import Llama3Tokenizer
    args = _dataset_args("--input-len", "12", "--output-len", "5")
    first, again = sample_requests(args, 16), sample_requests(args, 16)
    assert [(r.prompt, r.expected_output_len) for r in first] == [(r.prompt, r.expected_output_len) for r in again]
    other = sample_requests(_dataset_args("--input-len", "12", "--output-len", "5", "--seed", "1"), 16)
    assert [r.prompt for r in other] != [r.prompt for r in first]
    tokenizer = Llama3Tokenizer.default()
    for r in first:
        assert r.image is None and r.prompt_len == 12 and r.expected_output_len == 5
        assert len(tokenizer.encode(r.prompt)) == 12 and set(r.prompt.split()) <= set(WORDS)


def test_random_lengths_follow_the_range_ratio_and_the_defaults():
    ranged = sample_requests(_dataset_args("--input-len", "10", "--output-len", "20", "--random-range-ratio", "0.5"),
                             200)
    assert {r.prompt_len for r in ranged} <= set(range(5, 16)) and len({r.prompt_len for r in ranged}) > 5
    assert {r.expected_output_len for r in ranged} <= set(range(10, 31))
    default = sample_requests(_dataset_args(), 200)
    assert min(r.prompt_len for r in default) >= DEFAULT_INPUT_RANGE[0]
    assert max(r.prompt_len for r in default) <= DEFAULT_INPUT_RANGE[1]
    assert DEFAULT_OUTPUT_RANGE[0] <= min(r.expected_output_len for r in default)
    assert max(r.expected_output_len for r in default) <= DEFAULT_OUTPUT_RANGE[1]


def test_random_mm_puts_one_synthetic_image_on_the_asked_fraction():
    requests = sample_requests(_dataset_args("--dataset-name", "random-mm", "--random-mm-image-ratio", "0.25",
                                             "--random-mm-image-size", "64"), 16)
    images = [r.image for r in requests if r.image is not None]
    assert len(images) == 4 and all(i.shape == (64, 64, 3) and i.dtype == np.uint8 for i in images)
    assert requests[-1].image is None or requests[0].image is None  # shuffled, not all first


def test_demo_dataset_asks_the_demo_questions_about_its_pictures():
    requests = sample_requests(_dataset_args("--dataset-name", "demo", "--random-mm-image-ratio", "0.5"), 10)
    assert sum(r.image is not None for r in requests) == 5
    assert all(r.image is None or r.image.startswith(b"\x89PNG") for r in requests)
    assert {r.expected_output_len for r in requests} == {32}


def test_throughput_script_runs_the_random_mm_dataset():
    """benchmarks/throughput.py's default workload is `bench throughput --dataset-name random-mm
    --random-mm-image-ratio 0.5`'s, request for request."""
    sys.path.insert(0, str(REPO))
    from benchmarks.throughput import make_workload
    from engine.bench.throughput import engine_inputs
    script = make_workload(64, 0.5, 20, 80, 16, 128, 0)
    prompts, params = engine_inputs(sample_requests(
        parse_args(["bench", "throughput", "--dataset-name", "random-mm", "--random-mm-image-ratio", "0.5"]), 64))
    assert [p["prompt"] for p in script.prompts] == [p["prompt"] for p in prompts]
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(script.prompts, prompts) if "image" in a)
    assert [p.max_tokens for p in script.params] == [p.max_tokens for p in params]


# ---- statistics --------------------------------------------------------------------------------------------------
def _synthetic_results() -> list[RequestResult]:
    rng = np.random.default_rng(0)
    results = []
    for i in range(20):
        ttft = float(rng.uniform(0.05, 0.5))
        itl = [float(g) for g in rng.uniform(0.01, 0.04, int(rng.integers(0, 12)))]
        latency = ttft + sum(itl) + 0.001
        results.append(RequestResult(True, prompt_len=10 + i, output_tokens=len(itl) + 1, latency=latency, ttft=ttft,
                                     itl=itl))
    results.append(RequestResult(False, error="HTTP 400: no", latency=0.01))
    return results


def test_metrics_match_numpy():
    results = _synthetic_results()
    ok = [r for r in results if r.success]
    metrics = calculate_metrics(results, 2.0, ["ttft", "tpot", "itl", "e2el"], (50, 90, 99.9))
    ttft = np.array([r.ttft for r in ok])
    tpot = np.array([(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1])
    itl = np.concatenate([r.itl for r in ok])
    e2el = np.array([r.latency for r in ok])
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2el", e2el)):
        assert metrics[f"mean_{name}_ms"] == pytest.approx(values.mean() * 1000)
        assert metrics[f"median_{name}_ms"] == pytest.approx(np.median(values) * 1000)
        assert metrics[f"std_{name}_ms"] == pytest.approx(values.std() * 1000)
        for p, key in ((50, "p50"), (90, "p90"), (99.9, "p99.9")):
            assert metrics[f"{key}_{name}_ms"] == pytest.approx(np.percentile(values, p) * 1000)
    assert (metrics["completed"], metrics["failed"]) == (20, 1)
    total_in, total_out = sum(r.prompt_len for r in ok), sum(r.output_tokens for r in ok)
    assert (metrics["total_input_tokens"], metrics["total_output_tokens"]) == (total_in, total_out)
    assert metrics["request_throughput"] == 10.0 and metrics["output_throughput"] == total_out / 2
    assert metrics["total_token_throughput"] == (total_in + total_out) / 2


def test_single_token_outputs_have_no_tpot_and_no_samples_give_zeros():
    results = [RequestResult(True, output_tokens=1, latency=0.2, ttft=0.2)]
    assert metric_samples(results)["tpot"] == [] and metric_samples(results)["itl"] == []
    assert distribution([], (99,)).percentiles == {99: 0.0}
    assert calculate_metrics(results, 1.0, ["tpot"], (99,))["p99_tpot_ms"] == 0.0


def test_result_block_lists_the_selected_metrics():
    metrics = calculate_metrics(_synthetic_results(), 2.0, ["ttft", "itl"], (50, 99))
    block = format_result_block(metrics, ["ttft", "itl"], (50, 99), 8.0, 4)
    assert block.splitlines()[0].strip("=") == " Serving Benchmark Result "
    for label in ("Successful requests:", "Failed requests:", "Maximum request concurrency:",
                  "Request rate configured (RPS):", "Request throughput (req/s):", "Mean TTFT (ms):",
                  "P50 TTFT (ms):", "P99 ITL (ms):", "Median ITL (ms):"):
        assert label in block
    assert "TPOT" not in block


# ---- arrivals ----------------------------------------------------------------------------------------------------
def test_poisson_arrivals_have_mean_gap_one_over_the_rate_and_are_seeded():
    offsets = arrival_offsets(20001, 8.0, seed=0)
    gaps = np.diff(offsets)
    assert offsets[0] == 0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(1 / 8, rel=0.03)
    assert gaps.std() == pytest.approx(1 / 8, rel=0.05)  # exponential: std = mean
    assert np.array_equal(offsets, arrival_offsets(20001, 8.0, seed=0))
    assert not np.array_equal(offsets[:50], arrival_offsets(50, 8.0, seed=1))


def test_burstiness_and_infinite_rate():
    even = np.diff(arrival_offsets(20001, 4.0, burstiness=4.0, seed=0))
    assert even.mean() == pytest.approx(1 / 4, rel=0.03)
    assert (even.std() / even.mean()) ** 2 == pytest.approx(1 / 4, rel=0.1)  # gamma: CV^2 = 1 / shape
    assert np.array_equal(arrival_offsets(5, math.inf), np.zeros(5))
    for rate, burstiness in ((0.0, 1.0), (-1.0, 1.0), (1.0, 0.0)):
        with pytest.raises(ValueError, match="must be > 0"):
            arrival_offsets(3, rate, burstiness)


# ---- the commands, for real --------------------------------------------------------------------------------------
def test_bench_serve_against_a_real_server(tmp_path, capsys):
    from test_server import running_server
    with running_server("tiny", [], tmp_path / "serve.log") as server:
        code = main(["bench", "serve", "--base-url", server.url, "--dataset-name", "random-mm",
                     "--random-mm-image-ratio", "0.5", "--num-prompts", "6", "--input-len", "8", "--output-len", "4",
                     "--ignore-eos", "--request-rate", "20", "--max-concurrency", "3", "--metric-percentiles",
                     "50,99", "--disable-tqdm", "--save-result", "--result-dir", str(tmp_path / "results")])
        out = capsys.readouterr().out
        assert code == 0, out
        text_code = main(["bench", "serve", "--host", "127.0.0.1", "--port", server.url.rsplit(":", 1)[1],
                          "--num-prompts", "3", "--input-len", "8", "--output-len", "3", "--ignore-eos",
                          "--disable-tqdm", "--percentile-metrics", "ttft,e2el"])
        text_out = capsys.readouterr().out
    assert "/v1/chat/completions" in out  # images go to the chat endpoint
    for label in (f"{'Successful requests:':<40} 6", f"{'Total generated tokens:':<40} 24",
                  "Request rate configured (RPS):", "Mean TTFT (ms):", "P50 TTFT (ms):", "P99 ITL (ms):",
                  "Median TPOT (ms):"):
        assert label in out
    [saved] = (tmp_path / "results").glob("openai-chat-20.0qps-concurrency3-tiny-*.json")
    result = json.loads(saved.read_text())
    for key in ("duration", "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput",
                "output_throughput", "total_token_throughput", "mean_ttft_ms", "median_ttft_ms", "std_ttft_ms",
                "p99_ttft_ms", "p50_itl_ms", "p99_itl_ms", "mean_tpot_ms", "p99_tpot_ms", "request_rate",
                "max_concurrency", "model_id"):
        assert key in result, key
    assert (result["completed"], result["failed"], result["total_output_tokens"]) == (6, 0, 24)
    assert result["total_input_tokens"] > 6 * 8  # the server's count: the template and the images' tokens too
    assert "ttfts" not in result  # per-request lists only with --save-detailed
    assert text_code == 0 and "/v1/completions" in text_out and "Mean E2EL (ms):" in text_out
    assert "ITL" not in text_out and f"{'Successful requests:':<40} 3" in text_out


def test_bench_throughput_and_latency_in_process(tmp_path, capsys):
    out_json = tmp_path / "throughput.json"
    code = main(["bench", "throughput", "--model", "tiny", "--dataset-name", "random-mm", "--num-prompts", "4",
                 "--input-len", "8", "--output-len", "4", "--random-mm-image-ratio", "0.5", "--disable-tqdm",
                 "--output-json", str(out_json)])
    out = capsys.readouterr().out
    assert code == 0
    assert "Throughput: " in out and " requests/s, " in out and " total tokens/s, " in out and \
        " output tokens/s" in out and "Total num output tokens:  16" in out
    result = json.loads(out_json.read_text())
    assert set(result) >= {"elapsed_time", "num_requests", "total_num_tokens", "requests_per_second",
                           "tokens_per_second"}
    assert (result["num_requests"], result["total_output_tokens"]) == (4, 16)

    latency_json = tmp_path / "latency.json"
    code = main(["bench", "latency", "--model", "tiny", "--batch-size", "2", "--input-len", "8", "--output-len", "3",
                 "--num-iters-warmup", "1", "--num-iters", "3", "--disable-tqdm", "--output-json", str(latency_json)])
    out = capsys.readouterr().out
    assert code == 0 and "Avg latency: " in out and "99% percentile latency: " in out
    result = json.loads(latency_json.read_text())
    assert len(result["latencies"]) == 3 and result["avg_latency"] == pytest.approx(np.mean(result["latencies"]))
    assert set(result["percentiles"]) == {"10", "25", "50", "75", "90", "99"}
