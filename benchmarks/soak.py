"""Soak: `cogvlm2 serve` on loopback under a long mixed load, then a burst of huge images.

    python benchmarks/soak.py [--minutes 10] [--concurrency 8] [--model demo]

Phase 1 (baseline, a fifth of the time): good requests only. Phase 2: the same good requests mixed with bad ones
(every kind of invalid field, body, image, path and output constraint), streams aborted mid-way, and
image and JSON-schema requests. Every request
carries its own X-Request-Id; printed: requests lost (no final response, or a stream without its one terminal
event: must be 0), duplicated (a completion id or terminal event seen twice: 0), KV blocks leaked after each phase
(0), the server's RSS drift over phase 2, and the p50/p99 latency of the good requests in both phases. Then 32
concurrent requests with 6300x6300 PNGs: the peak rise of the server's RSS and where it settles.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import io
import json
import random
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.serving import launched_server  # noqa: E402

DEMO = REPO / "cogvlm2" / "demo_model"
BURST_SIZE = 32
BURST_PIXELS = 6300


# ---- the server --------------------------------------------------------------------------------------------------
def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def metrics(url: str) -> dict[str, float]:
    """The unlabelled series of /metrics (every one carries model_name and engine) by name."""
    families = text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text)
    return {s.name: s.value for f in families for s in f.samples if set(s.labels) <= {"model_name", "engine"}}


def leaked_blocks(url: str, timeout: float = 30) -> int:
    """KV blocks still held once the server is idle (0 when nothing leaks)."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        held = m["vllm:cogvlm2_kv_cache_blocks"] - m["vllm:cogvlm2_kv_cache_free_blocks"]
        idle = m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0
        if (held == 0 and idle) or time.monotonic() > deadline:
            return int(held)
        time.sleep(0.2)


# ---- requests ----------------------------------------------------------------------------------------------------
def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _user(text: str, image: str | None = None) -> list[dict]:
    content = text if image is None else [{"type": "text", "text": text},
                                          {"type": "image_url", "image_url": {"url": image}}]
    return [{"role": "user", "content": content}]


def _chat(**fields) -> dict:
    return {"model": "demo", "messages": _user("Who are you?"), "max_tokens": 8, "temperature": 0, **fields}


IMAGE = _data_url((DEMO / "demo_0.png").read_bytes())
SCHEMA = {"type": "object", "required": ["background", "count"], "additionalProperties": False,
          "properties": {"background": {"enum": ["grey", "white", "black"]},
                         "count": {"type": "integer", "minimum": 0, "maximum": 9}}}
GOOD = [_chat(), _chat(messages=_user("How many shapes are there?", IMAGE)), _chat(max_tokens=16, temperature=0.7,
                                                                                    seed=3),
        _chat(messages=_user("Describe the image as JSON.", IMAGE), max_tokens=40,
              response_format={"type": "json_schema", "json_schema": {"name": "shapes", "schema": SCHEMA}})]
BAD = [_chat(temperature=-1), _chat(seed=-1), _chat(top_p=0), _chat(max_tokens="x"), _chat(model="nope"),
       _chat(messages=_user("Hi", "data:image/png;base64,@@@")), _chat(messages=_user("Hi", "http://x/a.png")),
       _chat(messages=_user("Hi", "file:///tmp/a%00b.png")), _chat(messages=_user("Hi", "file:///" + "a" * 5000)),
       {**_chat(min_tokens=10 ** 6), "max_tokens": None}, _chat(logprobs=True, top_logprobs=99), b'{"model": ',
       _chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}),
       _chat(structured_outputs={"regex": "[a-z"}), _chat(tools=[{"type": "function"}])]


@dataclass
class Tally:
    sent: collections.Counter = field(default_factory=collections.Counter)
    answered: collections.Counter = field(default_factory=collections.Counter)
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    completion_ids: set[str] = field(default_factory=set)
    good_latency: list[float] = field(default_factory=list)
    statuses: collections.Counter = field(default_factory=collections.Counter)

    def completion(self, request_id: str, completion_id: str | None) -> None:
        if completion_id is None:
            return
        if completion_id in self.completion_ids:
            self.duplicated.append(request_id)
        self.completion_ids.add(completion_id)


async def _plain(client: httpx.AsyncClient, body, request_id: str, tally: Tally, good: bool) -> None:
    start = time.perf_counter()
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = await client.post("/v1/chat/completions", content=content,
                                 headers={"X-Request-Id": request_id, "Content-Type": "application/json"})
    tally.statuses[response.status_code] += 1
    if response.status_code >= 500:
        tally.lost.append(request_id)
        return
    if good:
        if response.status_code != 200:
            tally.lost.append(request_id)
            return
        tally.good_latency.append(time.perf_counter() - start)
    tally.completion(request_id, response.json().get("id"))
    tally.answered[request_id] += 1


async def _stream(client: httpx.AsyncClient, body: dict, request_id: str, tally: Tally, abort_after: int | None
                  ) -> None:
    """A stream read to its end (exactly one [DONE] expected), or dropped after `abort_after` events."""
    events, done = 0, 0
    async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True},
                             headers={"X-Request-Id": request_id}) as response:
        tally.statuses[response.status_code] += 1
        async for line in response.aiter_lines():
            if not line:
                continue
            events += 1
            done += line == "data: [DONE]"
            if abort_after is not None and events >= abort_after:
                return  # leaving the block closes the connection mid-stream
    if done != 1:
        (tally.duplicated if done > 1 else tally.lost).append(request_id)
    tally.answered[request_id] += 1


async def _one(client, kind: str, k: int, rng: random.Random, tally: Tally) -> None:
    request_id = f"{kind}-{k}"
    tally.sent[kind] += 1
    try:
        if kind == "good":
            await _plain(client, rng.choice(GOOD), request_id, tally, good=True)
        elif kind == "bad":
            await _plain(client, rng.choice(BAD), request_id, tally, good=False)
        elif kind == "stream":
            await _stream(client, rng.choice(GOOD), request_id, tally, None)
        else:  # aborted mid-stream
            await _stream(client, _chat(max_tokens=64, temperature=0.8), request_id, tally, rng.randint(1, 3))
    except httpx.HTTPError:
        if kind != "abort":
            tally.lost.append(request_id)


async def run_phase(url: str, seconds: float, concurrency: int, mix: dict[str, float], seed: int) -> Tally:
    rng, tally, counter = random.Random(seed), Tally(), iter(range(10 ** 9))
    kinds, weights = list(mix), list(mix.values())
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        async def worker() -> None:
            while time.monotonic() < deadline:
                await _one(client, rng.choices(kinds, weights)[0], next(counter), rng, tally)
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return tally


def _percentiles(latencies: list[float]) -> str:
    if not latencies:
        return "none"
    p50, p99 = np.percentile(np.array(latencies) * 1e3, [50, 99])
    return f"p50 {p50:.0f} ms, p99 {p99:.0f} ms over {len(latencies)}"


# ---- the image burst ---------------------------------------------------------------------------------------------
def _huge_png() -> bytes:
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (63, 63, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    small.resize((BURST_PIXELS, BURST_PIXELS), Image.Resampling.NEAREST).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


async def image_burst(url: str, pid: int) -> tuple[float, float, float, list[int]]:
    """(idle RSS, peak RSS, RSS 10 s after, status codes) of BURST_SIZE concurrent huge-PNG requests."""
    body = _chat(messages=_user("How many shapes are there?", _data_url(_huge_png())), max_tokens=4)
    idle, peak, done = rss_mb(pid), [rss_mb(pid)], asyncio.Event()

    async def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb(pid))
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch())
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        responses = await asyncio.gather(*(client.post("/v1/chat/completions", json=body)
                                           for _ in range(BURST_SIZE)))
    done.set()
    await watcher
    await asyncio.sleep(10)
    return idle, peak[0], rss_mb(pid), [r.status_code for r in responses]


def report(name: str, tally: Tally, leaked: int) -> None:
    print(f"[{name}] sent {sum(tally.sent.values())} ({dict(tally.sent)}), statuses {dict(tally.statuses)}")
    print(f"[{name}] lost {len(tally.lost)} {tally.lost[:5]}, duplicated {len(tally.duplicated)}, "
          f"KV blocks leaked {leaked}; good requests: {_percentiles(tally.good_latency)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--skip-burst", action="store_true")
    args = p.parse_args(argv)
    seconds = args.minutes * 60
    with tempfile.TemporaryDirectory(prefix="cogvlm2-soak-") as folder, launched_server(
            args.model, f"--max-model-len 512 --allowed-local-media-path {shlex.quote(folder)}", 180) as server:
        url, pid = server.url, server.pid
        asyncio.run(run_phase(url, 5, 2, {"good": 1}, seed=0))  # warm-up
        baseline = asyncio.run(run_phase(url, seconds / 5, args.concurrency, {"good": 1}, seed=1))
        report("good only", baseline, leaked_blocks(url))
        start_rss = rss_mb(pid)
        mixed = asyncio.run(run_phase(url, seconds, args.concurrency,
                                      {"good": 0.45, "bad": 0.25, "stream": 0.15, "abort": 0.15}, seed=2))
        leaked = leaked_blocks(url)
        report("mixed", mixed, leaked)
        drift = rss_mb(pid) - start_rss
        print(f"RSS over the mixed phase: {start_rss:.0f} -> {start_rss + drift:.0f} MB ({drift:+.0f} MB)")
        lost = len(baseline.lost) + len(mixed.lost)
        duplicated = len(baseline.duplicated) + len(mixed.duplicated)
        if not args.skip_burst:
            idle, peak, after, statuses = asyncio.run(image_burst(url, pid))
            print(f"burst of {BURST_SIZE} x {BURST_PIXELS}x{BURST_PIXELS} PNGs: RSS {idle:.0f} MB idle, peak "
                  f"{peak:.0f} MB (+{peak - idle:.0f}), {after:.0f} MB 10 s after ({after - idle:+.0f}); "
                  f"statuses {collections.Counter(statuses)}")
            leaked += leaked_blocks(url)
        log = Path(server.log_path).read_text()
        print(f"server log: {log.count('Traceback')} tracebacks")
    print(f"TOTAL lost {lost}, duplicated {duplicated}, leaked blocks {leaked}")
    return 0 if lost == duplicated == leaked == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
