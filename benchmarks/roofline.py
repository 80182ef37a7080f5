"""Roofline report: the engine's steps against this machine's measured limits, all in one run.

    python benchmarks/roofline.py --model bench [--json OUT]

1. Peak fp32 GEMM rate at the model's shapes (best of the available GEMMs: the engine's, MindSpore's, NumPy's
   OpenBLAS) and memory bandwidth (a large array copy on every core).
2. Steady-state decode steps at 1, 8, 32 and 64 running sequences (context ~256) and a 2048-token prefill.
   For each: the bound max(FLOPs / peak, bytes / bandwidth), the measured step time (decode: the median step;
   its bandwidth measured again just before and after its steps, since the load of other tenants moves it),
   the fraction of the bound achieved, and a breakdown: host (scheduler + input preparation + postprocessing), decoder, sampling, other.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cogvlm2.config import CogVLM2Config  # noqa: E402
from engine import SamplingParams  # noqa: E402
from benchmarks.dtype_runs import engine_model, entries  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402

HOST_PHASES = ("schedule", "prepare_inputs", "postprocess")


@dataclass
class MachineLimits:
    peak_gflops: float
    peak_source: str
    bandwidth_gbs: float
    gemm_table: list[dict]


@dataclass
class StepReport:
    name: str
    tokens: int
    context: int
    gflop: float
    gbytes: float
    bound_ms: float
    measured_ms: float
    fraction_of_bound: float
    gemm_gflops_achieved: float
    breakdown_ms: dict
    bandwidth_gbs: float  # what the bound was computed from


def _best_time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def gemm_shapes(c: CogVLM2Config, tokens: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of the decoder's language-expert GEMMs and the lm_head."""
    return [(tokens, c.hidden_size, c.qkv_size), (tokens, c.hidden_size, c.hidden_size),
            (tokens, c.hidden_size, c.intermediate_size), (tokens, c.intermediate_size, c.hidden_size),
            (tokens, c.hidden_size, c.vocab_size)]


def measure_gemm(c: CogVLM2Config, repeats: int = 3, dtype: str = "float32") -> tuple[float, str, list[dict]]:
    """The best GEMM rate at the decoder's shapes: for float32 among numpy's OpenBLAS, MindSpore's MatMul and the
    engine's kernel; for a 16-bit dtype the engine's kernel on weights stored (and computed) in that dtype."""
    import ml_dtypes
    from mindspore import Tensor, ops
    from cogvlm2.runtime import configure_mindspore
    configure_mindspore()
    matmul_nt = ops.MatMul(transpose_b=True)
    rng = np.random.default_rng(0)
    storage = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
    table, best, best_source = [], 0.0, ""
    for m, k, n in gemm_shapes(c, 32) + gemm_shapes(c, 2048)[:4]:
        a = rng.standard_normal((m, k), dtype=np.float32)
        w = rng.standard_normal((n, k), dtype=np.float32)
        ta, tw = Tensor(a), Tensor(w)
        candidates = {} if dtype != "float32" else {"numpy-openblas": lambda: a @ w.T,
                                                    "mindspore-matmul": lambda: matmul_nt(ta, tw).asnumpy()}
        try:
            from kernels.registry import get_kernels
            kernels = get_kernels("cpu", compute_dtype=dtype)
            tp = kernels.prepare_weight(w.astype(storage))  # the layout the engine loads its weights in
            candidates["engine-kernel"] = lambda: kernels.expert_linear(ta, m, tp, tp, None).asnumpy()
        except Exception:  # kernels not built here: the other GEMMs still give the machine's peak
            pass
        row = {"m": m, "k": k, "n": n}
        for name, fn in candidates.items():
            gflops = 2 * m * k * n / _best_time(fn, repeats) / 1e9
            row[name] = round(gflops, 1)
            if gflops > best:
                best, best_source = gflops, f"{name} at {m}x{k}x{n}"
        table.append(row)
    return best, best_source, table


def measure_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """GB/s of a large array copy (read + write) on every core, a slice per thread (numpy releases the GIL while it
    copies): the kernels stream weights on every core, and one core alone reached about half of this here."""
    src = np.ones(megabytes * 2 ** 20 // 4, np.float32)
    dst = np.empty_like(src)
    workers = os.cpu_count() or 1
    bounds = np.linspace(0, src.size, workers + 1).astype(int)
    slices = [(dst[a:b], src[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    with ThreadPoolExecutor(workers) as pool:
        seconds = _best_time(lambda: list(pool.map(lambda pair: np.copyto(*pair), slices)), repeats)
    return 2 * src.nbytes / seconds / 1e9


def decode_cost(c: CogVLM2Config, batch: int, context: int, weight_bytes_per: int = 4,
                kv_bytes_per: int = 4) -> tuple[float, float, float]:
    """(GFLOP, GB moved, GEMM GFLOP) of one decode step of `batch` sequences at `context` tokens, with weights and
    K/V of the given bytes per value."""
    d, f, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    layer_params = d * c.qkv_size + d * d + 3 * d * f
    gemm_flop = 2 * batch * (layers * layer_params + d * c.vocab_size)
    attn_flop = 4 * batch * context * c.num_attention_heads * c.head_dim * layers
    weight_bytes = weight_bytes_per * (layers * layer_params + d * c.vocab_size)
    kv_bytes = kv_bytes_per * 2 * batch * context * c.num_kv_heads * c.head_dim * layers
    return (gemm_flop + attn_flop) / 1e9, (weight_bytes + kv_bytes) / 1e9, gemm_flop / 1e9


def prefill_cost(c: CogVLM2Config, tokens: int, weight_bytes_per: int = 4,
                 kv_bytes_per: int = 4) -> tuple[float, float, float]:
    d, f, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    layer_params = d * c.qkv_size + d * d + 3 * d * f
    gemm_flop = 2 * tokens * layers * layer_params + 2 * d * c.vocab_size  # lm_head for the last token only
    attn_flop = 2 * tokens * tokens * c.num_attention_heads * c.head_dim * layers  # causal: half of 4 * T^2
    weight_bytes = weight_bytes_per * (layers * layer_params + d * c.vocab_size)
    kv_bytes = kv_bytes_per * 2 * tokens * c.num_kv_heads * c.head_dim * layers
    return (gemm_flop + attn_flop) / 1e9, (weight_bytes + kv_bytes) / 1e9, gemm_flop / 1e9


def _breakdown(engine: LLMEngine, total: float, steps: int) -> dict:
    phases = engine.timer.snapshot()
    host = sum(phases.get(p, 0.0) for p in HOST_PHASES)
    decoder = phases.get("decoder", 0.0) + phases.get("vision", 0.0)
    sample = phases.get("sample", 0.0)
    other = max(total - host - decoder - sample, 0.0)
    to_ms = lambda s: round(s / steps * 1000, 2)  # noqa: E731
    return {"host": to_ms(host), "decoder": to_ms(decoder), "sampling": to_ms(sample), "other": to_ms(other),
            "host_fraction": round(host / total, 4) if total else 0.0}


WORDS = ("apple", "river", "stone", "cloud", "green", "light", "north", "sound")


def _prompt_of(engine: LLMEngine, num_tokens: int, salt: int) -> str:
    """A base-template prompt of exactly num_tokens tokens (BOS + one token per word), distinct per salt."""
    words = [WORDS[(salt + i * (salt % 7 + 1)) % len(WORDS)] for i in range(num_tokens - 1)]
    text = words[0] + "".join(" " + w for w in words[1:])
    assert len(engine.tokenizer.encode(text)) == num_tokens - 1, "prompt words must be single tokens"
    return text


def _bytes_per(engine: LLMEngine) -> tuple[int, int]:
    """Bytes per weight (int8 under weight quantization; its per-channel scales are ~0.1% more) and per K/V value
    as the engine holds them."""
    weight_bytes = 1 if engine.args.quantization else engine.precision.weights.itemsize
    return weight_bytes, engine.precision.kv_bytes


def run_decode(engine: LLMEngine, batch: int, context: int, steps: int, limits: MachineLimits) -> StepReport:
    start_decode(engine, batch, context, steps)
    return finish_decode(engine, batch, context, [timed_step(engine) for _ in range(steps)], limits)


def start_decode(engine: LLMEngine, batch: int, context: int, steps: int) -> None:
    """`batch` sequences of `context` tokens prefilled and decoding, the phase timer reset: ready for `steps`
    timed steps."""
    warmup = 4 + -(-batch * context // engine.args.max_num_batched_tokens)  # prefill everyone, then decode
    for i in range(batch):
        engine.add_request(f"d{batch}-{i}", {"prompt": _prompt_of(engine, context, batch * 1000 + i),
                                             "template": "base"},
                           SamplingParams(temperature=0, max_tokens=warmup + steps + 4, ignore_eos=True))
    for _ in range(warmup):
        engine.step()
    assert engine.scheduler.num_running == batch and engine.scheduler.num_waiting == 0
    engine.timer.reset()


def timed_step(engine: LLMEngine) -> float:
    start = time.perf_counter()
    engine.step()
    return time.perf_counter() - start


def finish_decode(engine: LLMEngine, batch: int, context: int, step_seconds: list[float],
                  limits: MachineLimits) -> StepReport:
    steps = len(step_seconds)
    breakdown = _breakdown(engine, sum(step_seconds), steps)
    while engine.has_unfinished_requests():
        engine.step()
    gflop, gbytes, gemm_gflop = decode_cost(engine.config, batch, context, *_bytes_per(engine))
    # The median step: the steady state, robust to a burst of load from other tenants of this shared machine
    # (the mean is in the breakdown, which sums to it).
    return _report(f"decode x{batch}", batch, context, gflop, gbytes, gemm_gflop, float(np.median(step_seconds)),
                   breakdown, limits)


def run_prefill(engine: LLMEngine, tokens: int, limits: MachineLimits) -> StepReport:
    engine.add_request("prefill", {"prompt": _prompt_of(engine, tokens, 99), "template": "base"},
                       SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    engine.timer.reset()
    start = time.perf_counter()
    outputs = engine.step()
    total = time.perf_counter() - start
    breakdown = _breakdown(engine, total, 1)
    done = [o for o in outputs if o.request_id == "prefill"]
    if not done or done[0].error or len(done[0].outputs[0].token_ids) != 1:
        raise RuntimeError(f"the {tokens}-token prefill did not complete in one step: {done}")
    while engine.has_unfinished_requests():
        engine.step()
    gflop, gbytes, gemm_gflop = prefill_cost(engine.config, tokens, *_bytes_per(engine))
    return _report(f"prefill {tokens}", tokens, tokens, gflop, gbytes, gemm_gflop, total, breakdown, limits)


def _report(name, tokens, context, gflop, gbytes, gemm_gflop, seconds, breakdown, limits) -> StepReport:
    bound = max(gflop / limits.peak_gflops, gbytes / limits.bandwidth_gbs)
    return StepReport(name, tokens, context, round(gflop, 3), round(gbytes, 3), round(bound * 1000, 2),
                      round(seconds * 1000, 2), round(bound / seconds, 3), round(gemm_gflop / seconds, 1),
                      breakdown, limits.bandwidth_gbs)


@dataclass
class Loaded:
    """One --dtypes entry's engine and the machine's limits for its dtype."""
    dtype: str
    engine: LLMEngine
    limits: MachineLimits
    cold_start_s: float


def run_entries(args: argparse.Namespace, names: list[str]) -> list[dict]:
    """Every entry, one after the other; with --interleave all loaded at once and every timed step (and prefill
    repeat) alternated between them, so that a burst of load from other tenants hits each entry alike."""
    runs = []
    for group in [names] if args.interleave else [[name] for name in names]:
        with ExitStack() as stack:
            loaded = [load_entry(args, *stack.enter_context(engine_model(args.model, name)), name) for name in group]
            runs += measure(args, loaded)
            for entry in loaded:
                entry.engine.shutdown()
    return runs


def measure(args: argparse.Namespace, loaded: list[Loaded]) -> list[dict]:
    reports: list[list[StepReport]] = [[] for _ in loaded]
    for batch in (int(b) for b in args.batches.split(",")):
        for entry in loaded:
            start_decode(entry.engine, batch, args.context, args.steps)
        seconds = [[] for _ in loaded]
        bandwidth_before = measure_bandwidth()
        for _ in range(args.steps):
            for i, entry in enumerate(loaded):
                seconds[i].append(timed_step(entry.engine))
        # The bandwidth while these steps ran: other tenants' load moves it by a third from minute to minute here.
        bandwidth = round((bandwidth_before + measure_bandwidth()) / 2, 1)
        for i, entry in enumerate(loaded):
            reports[i].append(finish_decode(entry.engine, batch, args.context, seconds[i],
                                            replace(entry.limits, bandwidth_gbs=bandwidth)))
    best: list[StepReport | None] = [None] * len(loaded)
    for _ in range(args.prefill_repeats):
        for i, entry in enumerate(loaded):
            report = run_prefill(entry.engine, args.prefill_tokens, entry.limits)
            best[i] = report if best[i] is None or report.measured_ms < best[i].measured_ms else best[i]
    runs = []
    for entry, steps, prefill in zip(loaded, reports, best):
        print_reports(entry.dtype, steps + [prefill], entry.limits)
        runs.append({"dtype": entry.dtype, "cold_start_s": round(entry.cold_start_s, 2),
                     "limits": asdict(entry.limits), "steps": [asdict(r) for r in steps + [prefill]]})
    return runs


def load_entry(args: argparse.Namespace, model: str, settings: dict, dtype: str) -> Loaded:
    start = time.perf_counter()
    engine = LLMEngine(model, max_num_seqs=64, max_num_batched_tokens=args.prefill_tokens,
                       max_model_len=max(args.prefill_tokens, args.context + args.steps + 16) + 16,
                       enable_prefix_caching=False, **settings)
    cold_start = time.perf_counter() - start
    print(f"[{dtype}] cold start (load): {cold_start:.1f} s", flush=True)
    peak, source, table = measure_gemm(engine.config, dtype=engine.precision.compute)
    limits = MachineLimits(round(peak, 1), source, round(measure_bandwidth(), 1), table)
    print(f"[{dtype}] peak {engine.precision.compute} GEMM: {limits.peak_gflops} GFLOP/s ({source}); memory "
          f"bandwidth: {limits.bandwidth_gbs} GB/s; weights {engine.precision.weights}, KV {engine.precision.kv_cache}")
    for row in table:
        print("  gemm", row)
    return Loaded(dtype, engine, limits, cold_start)


def print_reports(dtype: str, reports: list[StepReport], limits: MachineLimits) -> None:
    print(f"\n[{dtype}] {'step':14} {'GFLOP':>8} {'GB':>7} {'GB/s':>6} {'bound ms':>9} {'step ms':>9} {'of bound':>9} "
          f"{'GEMM GF/s':>10} {'of peak':>8}  breakdown, mean ms (host / decoder / sampling / other)")
    for r in reports:
        b = r.breakdown_ms
        print(f"[{dtype}] {r.name:14} {r.gflop:8.2f} {r.gbytes:7.3f} {r.bandwidth_gbs:6.1f} {r.bound_ms:9.1f} "
              f"{r.measured_ms:9.1f} "
              f"{r.fraction_of_bound:9.1%} {r.gemm_gflops_achieved:10.1f} "
              f"{r.gemm_gflops_achieved / limits.peak_gflops:8.1%}  "
              f"{b['host']} / {b['decoder']} / {b['sampling']} / {b['other']}  (host {b['host_fraction']:.1%})")


def print_speedups(runs: list[dict]) -> None:
    """Every run against every earlier one."""
    for i, run in enumerate(runs):
        for base in runs[:i]:
            _print_speedup(run, base)


def _print_speedup(run: dict, base: dict) -> None:
    print(f"\n{run['dtype']} vs {base['dtype']} (step time ratio, same run):")
    for mine, theirs in zip(run["steps"], base["steps"]):
        print(f"  {mine['name']:14} {theirs['measured_ms'] / mine['measured_ms']:.2f}x faster "
              f"({theirs['measured_ms']:.1f} -> {mine['measured_ms']:.1f} ms; "
              f"{mine['fraction_of_bound']:.1%} of its own bound)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bench")
    p.add_argument("--dtypes", default="auto", help="comma-separated engine dtypes, measured one after the other "
                                                    "(e.g. float32-weights,float32,bfloat16: benchmarks/dtype_runs.py; "
                                                    "each run's ratios printed against every earlier one)")
    p.add_argument("--quantizations", default=None, help="comma-separated, crossed with --dtypes: none,w8a16,w8a8")
    p.add_argument("--kv-cache-dtypes", default=None, help="comma-separated, crossed with --dtypes: auto,int8")
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--prefill-tokens", type=int, default=2048)
    p.add_argument("--prefill-repeats", type=int, default=1, help="prefills per entry; the fastest is reported")
    p.add_argument("--interleave", action="store_true",
                   help="load every entry at once and alternate their timed steps (fairer ratios on a shared machine)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    runs = run_entries(args, entries(args.dtypes, args.quantizations, args.kv_cache_dtypes))
    print_speedups(runs)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
