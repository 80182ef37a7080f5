"""`cogvlm2 bench latency`: one batch of requests through the in-process engine, timed end to end over
--num-iters iterations after --num-iters-warmup, as vLLM's `vllm bench latency`."""
from __future__ import annotations

import argparse

from tqdm import tqdm

from engine.bench.datasets import add_dataset_args, sample_requests
from engine.bench.results import distribution, write_json
from engine.bench.throughput import engine_inputs, timed_generate
from engine.config import add_cli_args, engine_kwargs

REPORTED_PERCENTILES = (10, 25, 50, 75, 90, 99)


def add_latency_args(parser: argparse.ArgumentParser) -> None:
    add_cli_args(parser)  # --seed also seeds the dataset
    add_dataset_args(parser, input_len=32, output_len=128)
    parser.add_argument("--batch-size", type=int, default=8, help="requests per iteration")
    parser.add_argument("--num-iters-warmup", type=int, default=10, help="iterations run before timing")
    parser.add_argument("--num-iters", type=int, default=30, help="iterations timed")
    parser.add_argument("--output-json", default=None, metavar="FILE", help="write the latencies as JSON (- prints)")
    parser.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    from engine.llm import LLM  # lazy: building the parser must not load MindSpore
    if args.batch_size < 1 or args.num_iters < 1 or args.num_iters_warmup < 0:
        raise ValueError("--batch-size and --num-iters must be >= 1, --num-iters-warmup >= 0")
    prompts, params = engine_inputs(sample_requests(args, args.batch_size))
    latencies = []
    with LLM(args.model, **engine_kwargs(args)) as llm:
        for _ in tqdm(range(args.num_iters_warmup), desc="Warmup iterations", disable=args.disable_tqdm):
            timed_generate(llm, prompts, params, use_tqdm=False)
        for _ in tqdm(range(args.num_iters), desc="Profiling iterations", disable=args.disable_tqdm):
            outputs, seconds = timed_generate(llm, prompts, params, use_tqdm=False)
            failed = [o.error for o in outputs if o.error]
            if failed:
                raise RuntimeError(f"{len(failed)} requests failed, first: {failed[0]}")
            latencies.append(seconds)
    stats = distribution(latencies, REPORTED_PERCENTILES)
    print(f"Avg latency: {stats.mean} seconds")
    for p, value in stats.percentiles.items():
        print(f"{p}% percentile latency: {value} seconds")
    if args.output_json:
        write_json(args.output_json, {"avg_latency": stats.mean, "latencies": latencies,
                                      "percentiles": {str(p): v for p, v in stats.percentiles.items()}})
    return 0
