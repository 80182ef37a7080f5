"""`cogvlm2 bench throughput | latency | serve`: vLLM's `vllm bench` commands, flags and result keys, on this
engine (throughput and latency in process, serve against a running server). benchmarks/throughput.py and
benchmarks/serving.py run the same workloads, timings and statistics (datasets.py, results.py)."""
from __future__ import annotations

import argparse

from engine.bench import latency, serve, throughput
from engine.config_file import add_config_file_arg

COMMANDS = {
    "throughput": (throughput.add_throughput_args, throughput.main,
                   "every request to the in-process engine at once: requests/s and tokens/s"),
    "latency": (latency.add_latency_args, latency.main, "one batch end to end, repeated: latency percentiles"),
    "serve": (serve.add_serve_args, serve.main,
              "streaming load on a running server: throughput, TTFT, TPOT, ITL and E2EL percentiles"),
}


def add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks with vLLM's flags: throughput, latency, serve")
    commands = bench.add_subparsers(dest="bench_command", required=True)
    for name, (add_args, run, help_text) in COMMANDS.items():
        p = commands.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        add_config_file_arg(p)
        p.set_defaults(func=run)
