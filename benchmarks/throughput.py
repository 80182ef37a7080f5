"""Offline throughput: the engine (continuous batching) against the same requests run one at a time.

    python benchmarks/throughput.py --model bench --num-prompts 64 --image-ratio 0.5 [--json OUT]

The default workload is fixed and seeded: 64 requests, half with a synthetic picture, 20-80 prompt words,
16-128 output tokens (ignore_eos, so lengths are exact). Baselines in the same run: the same requests one at a
time, and static batches of 8 that wait for their longest member (as MindFormers serves). The engine's row is
what `cogvlm2 bench throughput --model bench --dataset-name random-mm --random-mm-image-ratio 0.5
--no-enable-prefix-caching` measures: the same workload (engine/bench/datasets.py) and timing.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.dtype_runs import engine_model, entries  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from engine.bench.datasets import random_requests  # noqa: E402
from engine.bench.results import distribution  # noqa: E402
from engine.bench.throughput import engine_inputs, timed_generate  # noqa: E402
from engine.outputs import RequestOutput  # noqa: E402
from engine.model_runner import DEFAULT_KV_CACHE_GB  # noqa: E402


@dataclass
class Workload:
    prompts: list[dict]
    params: list[SamplingParams]


def make_workload(num_prompts: int, image_ratio: float, min_words: int, max_words: int, min_out: int,
                  max_out: int, seed: int) -> Workload:
    """`cogvlm2 bench throughput --dataset-name random-mm`'s workload (engine/bench/datasets.py)."""
    requests = random_requests(num_prompts, (min_words, max_words), (min_out, max_out), image_ratio, seed)
    return Workload(*engine_inputs(requests))


@dataclass
class RunStats:
    name: str
    seconds: float
    requests_per_s: float
    output_tokens_per_s: float
    total_tokens_per_s: float
    ttft_ms: dict
    tpot_ms: dict
    gemm_gflop: float = 0.0  # the GEMM work the run had to do (engine runs only; see gemm_gflop())


def _percentiles(values: list[float]) -> dict:
    stats = distribution(values, (50, 90, 99), scale=1000)
    return {**{f"p{p}": v for p, v in stats.percentiles.items()}, "mean": stats.mean}


def summarise(name: str, outputs: list[RequestOutput], seconds: float) -> RunStats:
    failed = [o for o in outputs if o.error]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed, first: {failed[0].error}")
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    ttft = [o.metrics.first_token_time - o.metrics.arrival_time for o in outputs]
    tpot = [(o.metrics.finished_time - o.metrics.first_token_time) / (len(o.outputs[0].token_ids) - 1)
            for o in outputs if len(o.outputs[0].token_ids) > 1]
    return RunStats(name, seconds, len(outputs) / seconds, out_tokens / seconds,
                    (out_tokens + prompt_tokens) / seconds, _percentiles(ttft), _percentiles(tpot))


def run_engine(llm: LLM, workload: Workload, name: str = "engine (continuous batching)") -> RunStats:
    outputs, seconds = timed_generate(llm, workload.prompts, workload.params)
    stats = summarise(name, outputs, seconds)
    num_images = sum(1 for p in workload.prompts if isinstance(p, dict) and p.get("image") is not None)
    stats.gemm_gflop = gemm_gflop(llm.engine.config, outputs, num_images)
    return stats


def gemm_gflop(c, outputs: list[RequestOutput], num_images: int) -> float:
    """A lower bound on the work of serving `outputs` (attention, norms and activations left out): the decoder's
    GEMMs for every token it computes (prompt + output - 1 per request), the lm_head for every sampled token,
    and the vision encoder + adapter for every image."""
    d, f, v = c.hidden_size, c.intermediate_size, c.vision
    decoder_per_token = 2 * c.num_hidden_layers * (d * c.qkv_size + d * d + 3 * d * f)
    computed = sum(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) - 1 for o in outputs)
    sampled = sum(len(o.outputs[0].token_ids) for o in outputs)
    vh, patches = v.hidden_size, v.grid_size ** 2
    vision_layers = 2 * (patches + 1) * v.num_hidden_layers * (4 * vh * vh + 2 * vh * v.intermediate_size)
    adapter_rows = patches // 4
    adapter = 2 * adapter_rows * (4 * vh * vh + vh * d + 3 * d * f) + 2 * patches * vh * v.in_channels * v.patch_size ** 2
    total = computed * decoder_per_token + sampled * 2 * d * c.vocab_size + num_images * (vision_layers + adapter)
    return total / 1e9


def run_one_at_a_time(llm: LLM, workload: Workload, limit: int | None = None) -> RunStats:
    """Each request alone (the first `limit` of them); arrival is the run's start, as if all were queued at once."""
    from tqdm import tqdm
    pairs = list(zip(workload.prompts, workload.params))[:limit]
    start = time.perf_counter()
    outputs = []
    t0 = time.monotonic()
    for prompt, params in tqdm(pairs, desc="one at a time", unit="req"):
        out = llm.generate(prompt, params, use_tqdm=False)[0]
        out.metrics.arrival_time = t0
        outputs.append(out)
    name = "one at a time" + (f" (first {len(pairs)})" if limit and limit < len(workload.prompts) else "")
    return summarise(name, outputs, time.perf_counter() - start)


def run_static_batches(llm: LLM, workload: Workload, batch_size: int) -> RunStats:
    """MindFormers-style static batching: fixed groups that start together and all run until the group's longest
    member is done (nobody joins or leaves early). Only each request's own max_tokens count as useful output."""
    from tqdm import tqdm
    start = time.perf_counter()
    outputs = []
    t0 = time.monotonic()
    groups = range(0, len(workload.prompts), batch_size)
    for g in tqdm(groups, desc=f"static batches of {batch_size}", unit="batch"):
        prompts, params = workload.prompts[g:g + batch_size], workload.params[g:g + batch_size]
        longest = max(p.max_tokens for p in params)
        padded = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=longest) for _ in params]
        group_outputs = llm.generate(prompts, padded, use_tqdm=False)
        finished = time.monotonic()
        for out, own in zip(group_outputs, params):
            out.outputs[0].token_ids = out.outputs[0].token_ids[:own.max_tokens]
            out.metrics.arrival_time = t0
            out.metrics.finished_time = finished  # results come back when the whole batch is done
            outputs.append(out)
    return summarise(f"static batches of {batch_size}", outputs, time.perf_counter() - start)


def print_table(results: list[RunStats]) -> None:
    print(f"{'run':32} {'req/s':>8} {'out tok/s':>10} {'tot tok/s':>10} {'TTFT p50/p90/p99 ms':>24} "
          f"{'TPOT p50/p90/p99 ms':>22}")
    for r in results:
        ttft = "/".join(f"{r.ttft_ms[k]:.0f}" for k in ("p50", "p90", "p99"))
        tpot = "/".join(f"{r.tpot_ms[k]:.1f}" for k in ("p50", "p90", "p99"))
        print(f"{r.name:32} {r.requests_per_s:8.2f} {r.output_tokens_per_s:10.1f} {r.total_tokens_per_s:10.1f} "
              f"{ttft:>24} {tpot:>22}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bench")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--image-ratio", type=float, default=0.5)
    p.add_argument("--min-prompt-words", type=int, default=20)
    p.add_argument("--max-prompt-words", type=int, default=80)
    p.add_argument("--min-output-tokens", type=int, default=16)
    p.add_argument("--max-output-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--skip-one-at-a-time", action="store_true")
    p.add_argument("--one-at-a-time-limit", type=int, default=None,
                   help="run only the first N requests one at a time (its tokens/s still compares fairly)")
    p.add_argument("--static-batch", type=int, default=8, help="size of the static-batching baseline (0: skip)")
    p.add_argument("--kernels", default="auto", choices=["auto", "cpu", "reference", "compare"],
                   help="compare: the engine with the CPU kernels and with the reference composites, same run")
    p.add_argument("--dtypes", default=None,
                   help="comma-separated dtypes (float32-weights,float32,bfloat16,...: benchmarks/dtype_runs.py): the "
                        "same workload on one engine per dtype, side by side, with each one's KV capacity at the "
                        "default budget")
    p.add_argument("--quantizations", default=None,
                   help="comma-separated, crossed with --dtypes (default bfloat16): none,w8a16,w8a8")
    p.add_argument("--kv-cache-dtypes", default=None,
                   help="comma-separated, crossed with --dtypes (default bfloat16): auto,int8")
    p.add_argument("--rounds", type=int, default=1,
                   help="with --dtypes: load every engine at once and alternate N runs between them, keeping each "
                        "one's fastest (fairer ratios on a shared machine)")
    p.add_argument("--json", nargs="?", const="-", default=None, help="write results as JSON (to a file or -)")
    args = p.parse_args(argv)

    workload = make_workload(args.num_prompts, args.image_ratio, args.min_prompt_words, args.max_prompt_words,
                             args.min_output_tokens, args.max_output_tokens, args.seed)
    if args.dtypes or args.quantizations or args.kv_cache_dtypes:
        return compare_dtypes(args, workload, entries(args.dtypes or "bfloat16", args.quantizations,
                                                      args.kv_cache_dtypes))
    if args.kernels == "compare":
        results = [run_engine(make_llm(args, backend), workload, f"engine, kernels={backend}")
                   for backend in ("cpu", "reference")]
        print_table(results)
        print(f"kernels on / off: output tokens/s "
              f"{results[0].output_tokens_per_s / results[1].output_tokens_per_s:.2f}x")
        _write_json(args, results)
        return 0
    llm = make_llm(args, args.kernels)
    results = [run_engine(llm, workload)]
    if args.static_batch:
        results.append(run_static_batches(llm, workload, args.static_batch))
    if not args.skip_one_at_a_time:
        results.append(run_one_at_a_time(llm, workload, args.one_at_a_time_limit))
    print_table(results)
    for baseline in results[1:]:
        print(f"engine / {baseline.name}: output tokens/s "
              f"{results[0].output_tokens_per_s / baseline.output_tokens_per_s:.2f}x")
    print_ceiling(llm, results)
    _write_json(args, results)
    return 0


def compare_dtypes(args: argparse.Namespace, workload, dtypes: list[str]) -> int:
    """The workload on one engine per dtype. With --rounds N > 1 every engine is loaded at once and the runs
    alternate between them N times, each dtype's fastest run kept (the encoder cache then holds one image, so a
    later round still encodes its images)."""
    best: dict[str, RunStats] = {}
    capacity = {}
    for group in [dtypes] if args.rounds > 1 else [[dtype] for dtype in dtypes]:
        with ExitStack() as stack:
            llms = {}
            for dtype in group:
                model, settings = stack.enter_context(engine_model(args.model, dtype))
                llms[dtype] = make_llm(args, args.kernels, model=model, **settings,
                                       encoder_cache_size=1 if args.rounds > 1 else None)
                capacity[dtype] = kv_capacity(llms[dtype])
            for _ in range(args.rounds):
                for dtype, llm in llms.items():
                    stats = run_engine(llm, workload, f"engine, dtype={dtype}")
                    if dtype not in best or stats.output_tokens_per_s > best[dtype].output_tokens_per_s:
                        best[dtype] = stats
            for llm in llms.values():
                llm.shutdown()
    results = [best[dtype] for dtype in dtypes]
    print_table(results)
    for i, (dtype, result) in enumerate(zip(dtypes, results)):
        for base_dtype, base in zip(dtypes[:i], results[:i]):
            print(f"{dtype} / {base_dtype}: output tokens/s "
                  f"{result.output_tokens_per_s / base.output_tokens_per_s:.2f}x")
    print(f"KV capacity at the default budget of {DEFAULT_KV_CACHE_GB:g} GiB per device:")
    for dtype, (fits, allocated, block_bytes) in capacity.items():
        print(f"  {dtype}: {fits} tokens fit ({fits / capacity[dtypes[0]][0]:.2f}x {dtypes[0]}; "
              f"{block_bytes} bytes per block), {allocated} allocated (capped at max_num_seqs x max_model_len)")
    _write_json(args, results)
    return 0


def kv_capacity(llm: LLM) -> tuple[int, int, int]:
    """(tokens that fit the default KV budget, tokens allocated, bytes per block) of an engine."""
    stats = llm.stats()
    block_bytes = stats["kv_cache_bytes"] // stats["num_total_blocks"]
    return (int(DEFAULT_KV_CACHE_GB * 2 ** 30) // block_bytes * stats["block_size"],
            stats["num_total_blocks"] * stats["block_size"], block_bytes)


def print_ceiling(llm: LLM, results: list[RunStats]) -> None:
    """What this machine allows: the engine's GEMM work at the measured peak GEMM rate, as output tokens/s and as
    the largest possible ratio over each baseline measured here."""
    from benchmarks.roofline import measure_gemm
    engine = results[0]
    peak, source, _ = measure_gemm(llm.engine.config)
    best_seconds = engine.gemm_gflop / peak
    best_tokens_per_s = engine.output_tokens_per_s * engine.seconds / best_seconds
    print(f"ceiling: {engine.gemm_gflop:.0f} GFLOP of GEMMs at the peak {peak:.0f} GFLOP/s ({source}) take "
          f"{best_seconds:.1f} s (engine: {engine.seconds:.1f} s, {engine.gemm_gflop / engine.seconds:.0f} GFLOP/s, "
          f"{engine.gemm_gflop / engine.seconds / peak:.0%} of peak) -> at most {best_tokens_per_s:.0f} output tokens/s")
    for baseline in results[1:]:
        print(f"  at most {best_tokens_per_s / baseline.output_tokens_per_s:.1f}x {baseline.name} as measured")


def make_llm(args: argparse.Namespace, kernels: str, dtype: str = "auto", model: str | None = None,
             quantization: str | None = None, kv_cache_dtype: str = "auto",
             encoder_cache_size: int | None = None) -> LLM:
    start = time.perf_counter()
    cache = {} if encoder_cache_size is None else {"encoder_cache_size": encoder_cache_size}
    llm = LLM(model or args.model, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              enable_prefix_caching=False, kernels=kernels, dtype=dtype, quantization=quantization,
              kv_cache_dtype=kv_cache_dtype, **cache)
    print(f"engine ready in {time.perf_counter() - start:.1f} s ({args.model}, kernels={llm.stats()['kernels']})",
          file=sys.stderr)
    return llm


def _write_json(args: argparse.Namespace, results: list[RunStats]) -> None:
    if not args.json:
        return
    payload = json.dumps({"model": args.model, "num_prompts": args.num_prompts, "image_ratio": args.image_ratio,
                          "results": [asdict(r) for r in results]}, indent=2)
    if args.json == "-":
        print(payload)
    else:
        Path(args.json).write_text(payload)


if __name__ == "__main__":
    sys.exit(main())
