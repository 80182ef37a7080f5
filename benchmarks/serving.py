"""Serving benchmark: streaming chat requests against an OpenAI-compatible server over loopback.

    python benchmarks/serving.py --url http://127.0.0.1:8000 --num-requests 64 --concurrency 16 [--image-ratio 0.5]
    python benchmarks/serving.py --launch tiny --num-requests 64 --concurrency 16 --json out.json

Prints request throughput, output tokens/s, time to first token and inter-token latency percentiles (p50, p90,
p99) and failures. TTFT is measured at the client: request sent -> first chunk with content. Inter-token latency
is the gap between consecutive content chunks (the server sends one chunk per engine step, so per token unless the
client falls behind). Output tokens come from the stream's usage chunk. The requests, their sending and timing
are `cogvlm2 bench serve --dataset-name demo --endpoint /v1/chat/completions --max-concurrency N`'s
(engine/bench/), with this script's defaults: half the requests with an image, exactly --max-tokens tokens.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.bench.datasets import demo_requests  # noqa: E402
from engine.bench.results import distribution  # noqa: E402
from engine.bench.serve import CHAT, RequestResult, Target, request_payload, run_requests, served_model  # noqa: E402

PERCENTILES = (50, 90, 99)


# ---- workload ----------------------------------------------------------------------------------------------------
def build_payloads(num_requests: int, image_ratio: float, target: Target, max_tokens: int, ignore_eos: bool,
                   temperature: float, seed: int) -> list[dict[str, Any]]:
    return [request_payload(request, target, seed + i, temperature, ignore_eos)
            for i, request in enumerate(demo_requests(num_requests, image_ratio, max_tokens, seed))]


# ---- report ------------------------------------------------------------------------------------------------------
def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {f"p{p}": None for p in PERCENTILES}
    return {f"p{p}": v for p, v in distribution(values, PERCENTILES).percentiles.items()}


def summarise(results: list[RequestResult], duration: float, args: argparse.Namespace) -> dict[str, Any]:
    ok = [r for r in results if r.success]
    output_tokens = sum(r.output_tokens for r in ok)
    return {
        "num_requests": len(results), "concurrency": args.concurrency, "image_ratio": args.image_ratio,
        "max_tokens": args.max_tokens, "completed": len(ok), "failed": len(results) - len(ok),
        "duration_s": duration, "request_throughput": len(ok) / duration,
        "output_tokens": output_tokens, "output_token_throughput": output_tokens / duration,
        "ttft_s": percentiles([r.ttft for r in ok if r.ttft is not None]),
        "itl_s": percentiles([gap for r in ok for gap in r.itl]),
        "e2e_latency_s": percentiles([r.latency for r in ok]),
        "errors": sorted({r.error for r in results if r.error})[:10],
    }


def print_summary(s: dict[str, Any]) -> None:
    print(f"requests           {s['completed']} completed, {s['failed']} failed "
          f"(concurrency {s['concurrency']}, image ratio {s['image_ratio']}, max_tokens {s['max_tokens']})")
    print(f"duration           {s['duration_s']:.2f} s")
    print(f"request throughput {s['request_throughput']:.2f} req/s")
    print(f"output throughput  {s['output_token_throughput']:.1f} tokens/s ({s['output_tokens']} tokens)")
    for name, key in (("TTFT", "ttft_s"), ("inter-token", "itl_s"), ("e2e latency", "e2e_latency_s")):
        cells = "  ".join(f"{p} {v * 1000:8.1f} ms" if v is not None else f"{p}      n/a"
                          for p, v in s[key].items())
        print(f"{name:<18} {cells}")
    for error in s["errors"]:
        print(f"error: {error}")


# ---- optional server launch --------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class LaunchedServer:
    url: str
    pid: int | None = None  # None: a server this script did not launch
    log_path: str | None = None


@contextlib.contextmanager
def launched_server(model: str, server_args: str, startup_timeout: float = 120.0) -> Iterator[LaunchedServer]:
    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", prefix="cogvlm2-serve-", suffix=".log", delete=False)
    command = [sys.executable, "-m", "engine.cli", "serve", "--model", model, "--host", "127.0.0.1",
               "--port", str(port), "--disable-access-log", *shlex.split(server_args)]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, startup_timeout, log.name)
        print(f"launched {' '.join(command[2:])} (log {log.name})", file=sys.stderr)
        yield LaunchedServer(url, process.pid, log.name)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def wait_healthy(url: str, process: subprocess.Popen, timeout: float, log_path: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}: {Path(log_path).read_text()[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"the server at {url} was not healthy after {timeout} s")


# ---- main --------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="base URL of a running server, e.g. http://127.0.0.1:8000")
    target.add_argument("--launch", metavar="MODEL", help="start `cogvlm2 serve --model MODEL` on a free port")
    p.add_argument("--server-args", default="", help="extra `cogvlm2 serve` flags with --launch")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--image-ratio", type=float, default=0.5)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let requests stop at EOS (default: generate exactly --max-tokens)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="model name to send (default: the server's)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--timeout", type=float, default=600.0, help="per-request client timeout, seconds")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the summary as JSON")
    args = p.parse_args(argv)
    if args.num_requests < 1 or args.concurrency < 1 or not 0 <= args.image_ratio <= 1:
        p.error("--num-requests and --concurrency must be >= 1 and --image-ratio in [0, 1]")
    return args


def benchmark(url: str, args: argparse.Namespace) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    target = Target(url + CHAT, args.model or served_model(url, headers), True, headers, args.timeout)
    payloads = build_payloads(args.num_requests, args.image_ratio, target, args.max_tokens, args.ignore_eos,
                              args.temperature, args.seed)
    results, duration = asyncio.run(run_requests(target, payloads, max_concurrency=args.concurrency,
                                                 progress=sys.stderr.isatty()))
    return summarise(results, duration, args)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    launch = launched_server(args.launch, args.server_args) if args.launch else \
        contextlib.nullcontext(LaunchedServer(args.url))
    with launch as server:
        summary = benchmark(server.url.rstrip("/"), args)
    print_summary(summary)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
