"""`cogvlm2 bench serve`: streaming requests against a running OpenAI-compatible server, as vLLM's
`vllm bench serve`: request, output and total token throughput, and the mean, median and percentiles of time to
first token (TTFT), time per output token after the first (TPOT), inter-token latency (ITL) and end-to-end latency
(E2EL), all measured at the client.

TTFT runs from sending the request to the first chunk with text; ITL is the gap between consecutive chunks with
text (the server sends one per engine step, so per token unless the client falls behind); TPOT is a request's
(latency - TTFT) / (output tokens - 1). Token counts come from the stream's usage chunk (the server's tokenizer
and template), else the chunks are counted.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from engine.bench.datasets import DEFAULT_NUM_PROMPTS, ImageInput, SampleRequest, add_dataset_args, sample_requests
from engine.bench.results import distribution, parse_percentiles, percentile_label, write_json

if TYPE_CHECKING:
    import httpx

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
BACKENDS = {"openai": COMPLETIONS, "openai-chat": CHAT}
METRICS = {"ttft": ("TTFT", "Time to First Token"), "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
           "itl": ("ITL", "Inter-token Latency"), "e2el": ("E2EL", "End-to-end Latency")}
REQUEST_TIMEOUT_S = 6 * 3600.0  # a request that takes longer is a failure, not a hang
BLOCK_WIDTH = 50
ARRIVALS_STREAM = 1  # the arrival times draw from their own stream of --seed, apart from the dataset's


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    add_dataset_args(parser)
    parser.add_argument("--num-prompts", type=int, default=DEFAULT_NUM_PROMPTS, help="requests in the run")
    parser.add_argument("--seed", type=int, default=0, help="seeds the dataset, the arrival times and the requests")
    parser.add_argument("--base-url", default=None, help="the server, e.g. http://127.0.0.1:8000 (default: from "
                                                         "--host and --port)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--endpoint", default=None, help=f"{COMPLETIONS} or {CHAT} (default: the --backend's; "
                                                         f"chat when the dataset has images)")
    parser.add_argument("--backend", default=None, choices=sorted(BACKENDS),
                        help="openai: completions, openai-chat: chat completions (default: from --endpoint)")
    parser.add_argument("--model", default=None, help="the model name to send (default: the server's first)")
    parser.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY' (default: the "
                                                        "OPENAI_API_KEY environment variable)")
    parser.add_argument("--request-rate", type=float, default=math.inf,
                        help="requests per second: inf sends all at once, else Poisson arrivals (see --burstiness)")
    parser.add_argument("--burstiness", type=float, default=1.0,
                        help="gaps between arrivals follow a gamma distribution of this shape: 1 is a Poisson "
                             "process, below 1 burstier, above 1 more even")
    parser.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    parser.add_argument("--ignore-eos", action="store_true", help="generate exactly the output length")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default greedy)")
    parser.add_argument("--percentile-metrics", default="ttft,tpot,itl",
                        help=f"comma-separated, of {','.join(METRICS)}")
    parser.add_argument("--metric-percentiles", default="99", help='comma-separated percentiles, e.g. "50,90,99"')
    parser.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    parser.add_argument("--save-result", action="store_true", help="write the results as JSON")
    parser.add_argument("--save-detailed", action="store_true",
                        help="with --save-result: also per-request lengths, timings, texts and errors")
    parser.add_argument("--result-dir", default=None, help="folder of the JSON (default: the current one)")
    parser.add_argument("--result-filename", default=None,
                        help="name of the JSON (default: {label}-{rate}qps[-concurrency{n}]-{model}-{date}.json)")
    parser.add_argument("--label", default=None, help="prefix of the JSON's name (default: the backend)")


# ---- one request -------------------------------------------------------------------------------------------------
@dataclass
class Target:
    """Where requests go and how they are shaped."""
    api_url: str
    model: str
    chat: bool
    headers: dict[str, str] = field(default_factory=dict)
    timeout: float = REQUEST_TIMEOUT_S


@dataclass
class RequestResult:
    success: bool
    has_image: bool = False
    start_time: float = 0.0  # perf_counter() when sent
    latency: float = 0.0
    ttft: float | None = None  # None: no chunk carried text
    itl: list[float] = field(default_factory=list)
    prompt_len: int = 0
    output_tokens: int = 0
    generated_text: str = ""
    error: str = ""


def image_data_url(image: ImageInput) -> str:
    if isinstance(image, np.ndarray):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        image = buffer.getvalue()
    return f"data:image/png;base64,{base64.b64encode(image).decode()}"


def request_payload(request: SampleRequest, target: Target, seed: int, temperature: float,
                    ignore_eos: bool) -> dict[str, Any]:
    """One streaming request (with the usage chunk) of `request`; `seed` is the request's own."""
    body: dict[str, Any] = {"model": target.model}
    if target.chat:
        content: Any = request.prompt if request.image is None else [
            {"type": "text", "text": request.prompt},
            {"type": "image_url", "image_url": {"url": image_data_url(request.image)}}]
        body["messages"] = [{"role": "user", "content": content}]
    elif request.image is not None:
        raise ValueError(f"image requests need the chat endpoint ({CHAT}); {target.api_url} takes text only")
    else:
        body["prompt"] = request.prompt
    return {**body, "max_tokens": request.expected_output_len, "temperature": temperature, "seed": seed,
            "ignore_eos": ignore_eos, "stream": True, "stream_options": {"include_usage": True}}


def _chunk_text(choice: dict[str, Any], chat: bool) -> str:
    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
    return text or ""


async def send_request(client: httpx.AsyncClient, target: Target, payload: dict[str, Any]) -> RequestResult:
    """Streams one request; a non-200 answer, an error event or a stream that ends without its finish_reason and
    [DONE] is a failure."""
    import httpx
    result = RequestResult(False, has_image="messages" in payload and isinstance(
        payload["messages"][-1]["content"], list), start_time=time.perf_counter())
    token_times: list[float] = []
    texts: list[str] = []
    usage: dict[str, Any] = {}
    finished = done = False
    try:
        async with client.stream("POST", target.api_url, json=payload) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {body[:200]}"
                result.latency = time.perf_counter() - result.start_time
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise RuntimeError(chunk["error"].get("message"))
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices", []):
                    if text := _chunk_text(choice, target.chat):
                        token_times.append(time.perf_counter())
                        texts.append(text)
                    finished = finished or choice.get("finish_reason") is not None
    except (httpx.HTTPError, RuntimeError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"
        result.latency = time.perf_counter() - result.start_time
        return result
    result.latency = time.perf_counter() - result.start_time
    if not (done and finished):
        result.error = "stream ended without finish_reason and [DONE]"
        return result
    result.success = True
    result.ttft = token_times[0] - result.start_time if token_times else None
    result.itl = [float(gap) for gap in np.diff(token_times)]
    result.prompt_len = usage.get("prompt_tokens", 0)
    result.output_tokens = usage.get("completion_tokens", len(token_times))
    result.generated_text = "".join(texts)
    return result


# ---- the load ----------------------------------------------------------------------------------------------------
def arrival_offsets(num_requests: int, request_rate: float, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """Seconds after the start at which each request is sent: all at 0 for an infinite rate, else the first at 0
    and gamma-distributed gaps of mean 1 / request_rate (shape `burstiness`; 1: exponential, a Poisson process)."""
    if not request_rate > 0 or not burstiness > 0:
        raise ValueError(f"--request-rate and --burstiness must be > 0, got {request_rate} and {burstiness}")
    if math.isinf(request_rate):
        return np.zeros(num_requests)
    rng = np.random.default_rng([ARRIVALS_STREAM, seed])
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=max(num_requests - 1, 0))
    return np.concatenate([[0.0], np.cumsum(gaps)])[:num_requests]


async def run_requests(target: Target, payloads: list[dict[str, Any]], request_rate: float = math.inf,
                       burstiness: float = 1.0, max_concurrency: int | None = None, seed: int = 0,
                       progress: bool = False) -> tuple[list[RequestResult], float]:
    """Sends the payloads at their arrival times, at most `max_concurrency` in flight (the rest wait their turn):
    the results in payload order, and the seconds from the first send to the last answer."""
    import httpx
    offsets = arrival_offsets(len(payloads), request_rate, burstiness, seed)
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()
    limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
    with tqdm(total=len(payloads), desc="requests", unit="req", disable=not progress) as bar:
        async with httpx.AsyncClient(headers=target.headers, limits=limits, timeout=target.timeout) as client:
            start = time.perf_counter()

            async def one(payload: dict[str, Any], offset: float) -> RequestResult:
                await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
                async with slots:
                    result = await send_request(client, target, payload)
                bar.update(1)
                return result

            results = await asyncio.gather(*(one(p, o) for p, o in zip(payloads, offsets)))
            return list(results), time.perf_counter() - start


# ---- the report --------------------------------------------------------------------------------------------------
def metric_samples(results: list[RequestResult]) -> dict[str, list[float]]:
    """Each metric's samples in seconds, over the successful requests."""
    ok = [r for r in results if r.success]
    return {"ttft": [r.ttft for r in ok if r.ttft is not None],
            "tpot": [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok
                     if r.ttft is not None and r.output_tokens > 1],
            "itl": [gap for r in ok for gap in r.itl],
            "e2el": [r.latency for r in ok]}


def calculate_metrics(results: list[RequestResult], duration: float, selected: Sequence[str],
                      percentiles: Sequence[float]) -> dict[str, Any]:
    """vLLM's result keys: completed, request_throughput, ..., and mean_/median_/std_/p{N}_{metric}_ms for the
    selected metrics."""
    ok = [r for r in results if r.success]
    total_input, total_output = sum(r.prompt_len for r in ok), sum(r.output_tokens for r in ok)
    metrics: dict[str, Any] = {
        "duration": duration, "completed": len(ok), "failed": len(results) - len(ok),
        "total_input_tokens": total_input, "total_output_tokens": total_output,
        "request_throughput": len(ok) / duration, "output_throughput": total_output / duration,
        "total_token_throughput": (total_input + total_output) / duration}
    samples = metric_samples(results)
    for name in selected:
        stats = distribution(samples[name], percentiles, scale=1000)
        metrics |= {f"mean_{name}_ms": stats.mean, f"median_{name}_ms": stats.median, f"std_{name}_ms": stats.std}
        metrics |= {f"p{percentile_label(p)}_{name}_ms": v for p, v in stats.percentiles.items()}
    return metrics


def format_result_block(metrics: dict[str, Any], selected: Sequence[str], percentiles: Sequence[float],
                        request_rate: float, max_concurrency: int | None) -> str:
    lines = [" Serving Benchmark Result ".center(BLOCK_WIDTH, "=")]

    def row(label: str, value: Any) -> None:
        lines.append(f"{label:<40} {value:<10.2f}" if isinstance(value, float) else f"{label:<40} {value:<10}")

    row("Successful requests:", metrics["completed"])
    row("Failed requests:", metrics["failed"])
    if max_concurrency is not None:
        row("Maximum request concurrency:", max_concurrency)
    if not math.isinf(request_rate):
        row("Request rate configured (RPS):", float(request_rate))
    row("Benchmark duration (s):", float(metrics["duration"]))
    row("Total input tokens:", metrics["total_input_tokens"])
    row("Total generated tokens:", metrics["total_output_tokens"])
    row("Request throughput (req/s):", float(metrics["request_throughput"]))
    row("Output token throughput (tok/s):", float(metrics["output_throughput"]))
    row("Total token throughput (tok/s):", float(metrics["total_token_throughput"]))
    for name in selected:
        short, header = METRICS[name]
        lines.append(header.center(BLOCK_WIDTH, "-"))
        row(f"Mean {short} (ms):", metrics[f"mean_{name}_ms"])
        row(f"Median {short} (ms):", metrics[f"median_{name}_ms"])
        for p in percentiles:
            row(f"P{percentile_label(p)} {short} (ms):", metrics[f"p{percentile_label(p)}_{name}_ms"])
    lines.append("=" * BLOCK_WIDTH)
    return "\n".join(lines)


def parse_metric_names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise ValueError(f"--percentile-metrics: {unknown or text!r} not among {', '.join(METRICS)}")
    return names


# ---- the command -------------------------------------------------------------------------------------------------
def served_model(base_url: str, headers: dict[str, str]) -> str:
    import httpx
    return httpx.get(f"{base_url}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]


def resolve_endpoint(endpoint: str | None, backend: str | None, has_images: bool) -> str:
    if endpoint is not None:
        return endpoint
    if backend is not None:
        return BACKENDS[backend]
    return CHAT if has_images else COMPLETIONS


def result_path(args: argparse.Namespace, backend: str, model: str, now: datetime.datetime) -> Path | None:
    if not args.save_result:
        return None
    concurrency = f"-concurrency{args.max_concurrency}" if args.max_concurrency is not None else ""
    name = args.result_filename or (f"{args.label or backend}-{args.request_rate}qps{concurrency}-"
                                    f"{Path(model).name}-{now:%Y%m%d-%H%M%S}.json")
    return Path(args.result_dir or ".") / name


def main(args: argparse.Namespace) -> int:
    if args.num_prompts < 1 or (args.max_concurrency is not None and args.max_concurrency < 1):
        raise ValueError("--num-prompts and --max-concurrency must be >= 1")
    selected, percentiles = parse_metric_names(args.percentile_metrics), parse_percentiles(args.metric_percentiles)
    arrival_offsets(0, args.request_rate, args.burstiness)  # checks both before any request is sent
    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    requests = sample_requests(args, args.num_prompts)
    endpoint = resolve_endpoint(args.endpoint, args.backend, any(r.image is not None for r in requests))
    chat = endpoint.rstrip("/").endswith("chat/completions")
    target = Target(base_url + endpoint, args.model or served_model(base_url, headers), chat, headers)
    payloads = [request_payload(r, target, args.seed + i, args.temperature, args.ignore_eos)
                for i, r in enumerate(requests)]
    distribution_name = "Poisson process" if args.burstiness == 1 else "gamma distribution"
    print(f"{target.api_url}, model {target.model!r}: {len(payloads)} requests ({args.dataset_name}), request rate "
          f"{args.request_rate} ({distribution_name}, burstiness {args.burstiness}), "
          f"max concurrency {args.max_concurrency}")
    now = datetime.datetime.now()
    results, duration = asyncio.run(run_requests(target, payloads, args.request_rate, args.burstiness,
                                                 args.max_concurrency, args.seed, progress=not args.disable_tqdm))
    metrics = calculate_metrics(results, duration, selected, percentiles)
    for error in sorted({r.error for r in results if r.error})[:10]:
        print(f"error: {error}")
    print(format_result_block(metrics, selected, percentiles, args.request_rate, args.max_concurrency))
    backend = "openai-chat" if chat else "openai"
    path = result_path(args, backend, target.model, now)
    if path is not None:
        write_json(path, {"date": f"{now:%Y%m%d-%H%M%S}", "backend": backend, "label": args.label,
                          "model_id": target.model, "endpoint": endpoint, "dataset_name": args.dataset_name,
                          "num_prompts": args.num_prompts, "request_rate": _json_number(args.request_rate),
                          "burstiness": args.burstiness, "max_concurrency": args.max_concurrency, **metrics,
                          **(_per_request(results) if args.save_detailed else {})})
    return 0 if metrics["failed"] == 0 else 1


def _json_number(value: float) -> float | str:
    return "inf" if math.isinf(value) else value  # JSON has no infinity


def _per_request(results: list[RequestResult]) -> dict[str, list]:
    return {"input_lens": [r.prompt_len for r in results], "output_lens": [r.output_tokens for r in results],
            "ttfts": [r.ttft for r in results], "itls": [r.itl for r in results],
            "latencies": [r.latency for r in results], "generated_texts": [r.generated_text for r in results],
            "errors": [r.error for r in results]}
