"""`cogvlm2 tune`: sweeps each CPU kernel's parameters (threads, tiles, GEMM choice) over the decode and prefill
shape classes on this device and writes configs/kernels/<sku>.yaml, the table the registry loads. The projection
has one op per weight dtype and compute dtype (kernels.registry.PANEL_OPS): expert_linear (float32 weights),
expert_linear_bf16 (bf16 weights, fp32 math), expert_linear_bf16_dot (bf16 products), expert_linear_f16; for int8
weights, w8a16's expert_linear_i8 (widened, fp32 math) and expert_linear_i8_bf16_dot (bf16 products), and w8a8's
expert_linear_i8_vnni (int8 dot: only threads and tile rows, it takes all of k in one pass).

A candidate's score over a class is the mean over the class's shapes of time / best time of that shape, so that
every shape counts equally whatever its size. Times are minima over repeated runs (the machine is shared).
Paged attention is timed with each KV cache dtype and attention math (PAGED_COLUMNS), every (shape, kind) one
column of the score; the record also names the best candidate per kind, to show whether the tiles should depend on
it. Where candidates differ in a parameter that sets the op's results (kernels.sku.RESULT_PARAMS), both classes
get the value that costs least over the two, and each class its fastest candidate with that value.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import itertools
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

PANEL_OPS = ("expert_linear", "expert_linear_bf16", "expert_linear_bf16_dot", "expert_linear_f16", "expert_linear_i8",
             "expert_linear_i8_bf16_dot", "expert_linear_i8_vnni")
ROW_OPS = ("rms_norm", "swiglu", "gelu")  # one pass over rows of activations: only threads to choose
OPS = ("rope",) + ROW_OPS + ("paged_attention",) + PANEL_OPS
# Paged attention's columns: (KV cache dtype, compute dtype); bf16 compute over a bf16 cache is the bf16 math
# (bf16 products, kernels.reference.uses_bf16_attention), the others multiply in fp32.
PAGED_COLUMNS = (("float32", "float32"), ("bfloat16", "float32"), ("float16", "float32"), ("bfloat16", "bfloat16"))


@dataclass(frozen=True)
class Shape:
    """A layer's attention geometry and a batch: `lens` context lengths, `new` this step's tokens per sequence."""
    name: str
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    mlp: int
    lens: tuple[int, ...]
    new: tuple[int, ...]

    @property
    def tokens(self) -> int:
        return sum(self.new)


# Representative batches per class: the bench preset's layer and the 19B layer (small token counts).
SHAPES: dict[str, list[Shape]] = {
    "decode": [Shape("bench 32 decodes x 512", 16, 4, 64, 1024, 2816, (512,) * 32, (1,) * 32),
               Shape("bench 8 decodes x 128", 16, 4, 64, 1024, 2816, (128,) * 8, (1,) * 8),
               Shape("19b 8 decodes x 512", 32, 8, 128, 4096, 14336, (512,) * 8, (1,) * 8)],
    "prefill": [Shape("bench chunk 256 + 8 decodes", 16, 4, 64, 1024, 2816, (256,) + (300,) * 8,
                      (256,) + (1,) * 8),
                Shape("bench chunk 128 from 64", 16, 4, 64, 1024, 2816, (192,), (128,)),
                Shape("19b chunk 128", 32, 8, 128, 4096, 14336, (128,), (128,))],
}

# The projections also at one decode and at a long prefill (their own classes' extremes; attention is tuned on
# SHAPES only, where a 2048-token prompt would cost minutes per candidate).
GEMM_SHAPES: dict[str, list[Shape]] = {
    "decode": [Shape("19b 1 decode x 512", 32, 8, 128, 4096, 14336, (512,), (1,)),
               Shape("bench 1 decode x 512", 16, 4, 64, 1024, 2816, (512,), (1,)),
               # the few-token calls where w8a16's widen_rows decides (the other shapes take 1 or >= 8 tokens)
               Shape("bench 4 decodes x 512", 16, 4, 64, 1024, 2816, (512,) * 4, (1,) * 4)],
    "prefill": [Shape("bench prompt 2048", 16, 4, 64, 1024, 2816, (2048,), (2048,))],
}

# The panel GEMM's parameters: threads, k per pass over the panels (0: the kernel's default), tokens per tile (0:
# the kernel's default).
PANEL_CANDIDATES = [{"threads": t, "k_block": k, "tile_rows": r}
                    for t, k, r in itertools.product((1, 2), (512, 1024, 0, 4096), (0, 6, 12))]

CANDIDATES: dict[str, dict[str, list[dict[str, int]]]] = {
    **{op: {cls: [{"threads": t} for t in (1, 2)] for cls in SHAPES} for op in ("rope",) + ROW_OPS},
    # amx only acts on bf16 math (compute dtype bfloat16), which these float32-math columns do not run: kept on.
    "paged_attention": {
        "decode": [{"threads": t, "query_tile": 1, "key_tile": k, "parallel_min_work": w, "amx": 1}
                   for t, k, w in itertools.product((1, 2), (32, 64, 128), (1 << 16, 1 << 20))],
        "prefill": [{"threads": t, "query_tile": q, "key_tile": k, "parallel_min_work": 1 << 20, "amx": 1}
                    for t, q, k in itertools.product((1, 2), (4, 8, 16, 32), (32, 64, 128))],
    },
    "expert_linear": {cls: [{"threads": t, "gemm": 0, "k_block": k, "n_block": n}
                            for t, (k, n) in itertools.product((1, 2), ((0, 0), (1024, 32), (512, 64), (256, 128)))]
                      + [{"threads": t, "gemm": g, "k_block": 0, "n_block": 0} for g in (1, 2) for t in (1, 2)]
                      + [{"threads": 2, "gemm": 3, "k_block": 0, "n_block": 0}]
                      + [{"threads": c["threads"], "gemm": 4, "k_block": c["k_block"], "n_block": 0,
                          "tile_rows": c["tile_rows"]} for c in PANEL_CANDIDATES]
                      for cls in SHAPES},
    **{op: {cls: PANEL_CANDIDATES for cls in SHAPES} for op in PANEL_OPS[1:]},
    "expert_linear_i8_vnni": {cls: [{"threads": t, "k_block": 0, "tile_rows": r}
                                    for t, r in itertools.product((1, 2), (0, 4, 6, 10, 12))] for cls in SHAPES},
}
# Decode calls also choose how much work takes the threads (the same bits either way): a helper that starts late on
# a loaded core makes the call wait for it (measured here with helpers spawned per call, on warm weights: two
# threads lost to one on 2-16 MB at one token; with kept helpers and cold weights two won from 2 MB).
for _op in PANEL_OPS:
    CANDIDATES[_op]["decode"] = [{**c, "parallel_min_work": w} for c in CANDIDATES[_op]["decode"]
                                 for w in (1 << 20, 1 << 24)]
# w8a16's bf16 products: also the widest call whose int8 weights are widened rather than paired (the same bits;
# prefill calls are wider than any of these).
CANDIDATES["expert_linear_i8_bf16_dot"]["decode"] = [{**c, "widen_rows": w}
                                                     for c in CANDIDATES["expert_linear_i8_bf16_dot"]["decode"]
                                                     for w in (0, 1, 2, 4)]
# Swept once the rest of a decode projection's parameters are chosen, as variants of the chosen candidate (alone
# they move its speed little, and a joint sweep would multiply its candidates): from how many tokens the tiles
# prefetch the panel slice read next (the same bits). Measured here: prefetching slowed bf16 weights 4-20% at 1 and
# 8 tokens and sped them up 5-14% at 32; w8a16's int8 panels gained 10-33% from it at every count.
REFINED_DECODE_PARAMS = {"prefetch_rows": (0, 2, 16, 1 << 30)}
# The dot products that can take AMX tiles (for 16 tokens or more, where the CPU has them): each candidate with and
# without.
AMX_OPS = ("expert_linear_bf16_dot", "expert_linear_i8_vnni")
for _op in AMX_OPS:
    CANDIDATES[_op] = {cls: [{**c, "amx": a} for c in CANDIDATES[_op][cls] for a in (1, 0)] for cls in SHAPES}


def shapes_of(op: str, cls: str) -> list[Shape]:
    return SHAPES[cls] + (GEMM_SHAPES[cls] if op in PANEL_OPS else [])


def panel_variant(op: str) -> tuple[np.dtype, str, str | None]:
    """(weight dtype, compute dtype, quantization) of a projection op: the first pair kernels.registry.PANEL_OPS
    maps to it (a quantization's op: float32 weights, quantized by the kernel set)."""
    from mindspore import dtype as mstype

    from kernels.registry import PANEL_OPS as OPS_BY_DTYPES
    from kernels.registry import WEIGHT_DTYPES
    numpy_dtype = {ms_dtype: np_dtype for np_dtype, ms_dtype in WEIGHT_DTYPES.items()}
    w, c = next(key for key, variant in OPS_BY_DTYPES.items() if variant == op)
    if w == mstype.int8:  # w8a16's int8 weights
        return np.dtype(np.float32), c, "w8a16"
    return (np.dtype(np.float32), c, w) if isinstance(w, str) else (numpy_dtype[w], c, None)


def run_once(fn: Callable[[], object]) -> float:
    """ms of one call; launches are blocking (configure_mindspore), so the op is done when the call returns."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


# A projection's weights are timed as the decoder meets them: streamed from memory, each layer's new to the cache.
# Workloads rotate through copies of theirs that add up to at least this (twice this machine's 32 MB L3): on warm
# weights the tuner had kept 2 threads from a 2 MB projection at one token and preferred w8a16's bf16 pairs at 4.
COLD_WEIGHT_BYTES = 64 << 20


def cold_copies(itemsize: int, qkv: int, s: Shape) -> int:
    """Copies of a panel workload's weights (both experts of the QKV and down projections, `itemsize` bytes per
    weight as stored) that fill COLD_WEIGHT_BYTES."""
    return max(1, -(-COLD_WEIGHT_BYTES // (2 * (qkv * s.hidden + s.hidden * s.mlp) * itemsize)))


class Workload:
    """Inputs of `op` for one shape, built once; `call(kernels)` runs the op (expert_linear: two projections).
    cache_dtype: paged attention's KV cache dtype."""

    def __init__(self, op: str, shape: Shape, rng: np.random.Generator, cache_dtype: str = "float32",
                 compute_dtype: str = "float32"):
        from mindspore import Parameter, Tensor

        from kernels.reference import make_paged_batch
        from kernels.registry import pad_block_tables

        normal = lambda *s: Tensor(rng.standard_normal(s).astype(np.float32))  # noqa: E731
        i32 = lambda a: Tensor.from_numpy(np.ascontiguousarray(a, np.int32))  # noqa: E731
        self.op, n, s = op, shape.tokens, shape
        self.variant: tuple[str, str | None] = (compute_dtype, None)  # the kernel set's (compute, quantization)
        if op in PANEL_OPS:  # the QKV projection (with the vision bias) and the MLP's down projection
            from kernels.ops import pack_weight
            from kernels.registry import CpuKernels
            from kernels.sku import KernelParams
            dtype, compute, quantization = panel_variant(op)
            self.variant = (compute, quantization)
            # a quantization's weights as its kernel set prepares them (the layout does not depend on parameters:
            # the defaults', not this SKU's table, which may be what is being re-tuned)
            prepare = CpuKernels(KernelParams("tune", "defaults"), compute, quantization).prepare_weight \
                if quantization else lambda w: Tensor.from_numpy(pack_weight(w))
            qkv = (s.heads + 2 * s.kv_heads) * s.head_dim
            x = [normal(n, s.hidden), normal(n, s.mlp)]
            biases = [normal(qkv), None]
            self.prepacked_calls, self.calls = [], []
            for _ in range(cold_copies(1 if quantization else np.dtype(dtype).itemsize, qkv, s)):
                weights = [(rng.standard_normal((qkv, s.hidden)), rng.standard_normal((qkv, s.hidden))),
                           (rng.standard_normal((s.hidden, s.mlp)), rng.standard_normal((s.hidden, s.mlp)))]
                weights = [tuple(w.astype(np.float32).astype(dtype) for w in pair) for pair in weights]
                # the same projections on weights in the prepacked layout, for candidates that load them so
                # (16-bit weights: always)
                prepacked = [(x[i], n // 2, prepare(wl), prepare(wv), biases[i]) for i, (wl, wv) in enumerate(weights)]
                self.prepacked_calls.append(prepacked)
                self.calls.append([(x[i], n // 2, Tensor(wl), Tensor(wv), biases[i])
                                   for i, (wl, wv) in enumerate(weights)] if op == "expert_linear" else prepacked)
            self.next_copy = 0
            return
        batch = make_paged_batch(list(s.lens), list(s.new), 16, rng, shuffle=True)
        q, k, v = normal(n, s.heads, s.head_dim), normal(n, s.kv_heads, s.head_dim), normal(n, s.kv_heads, s.head_dim)
        positions = i32(batch.token_position)
        cos, sin = normal(8192, s.head_dim), normal(8192, s.head_dim)
        if op == "rope":
            self.calls = [(q, k, positions, cos, sin)]
            return
        if op == "rms_norm":  # the decoder's norm over hidden-size rows
            self.calls = [(normal(n, s.hidden), normal(s.hidden), 1e-5)]
            return
        if op == "swiglu":
            self.calls = [(normal(n, 2 * s.mlp),)]
            return
        if op == "gelu":  # the vision MLP's fc1 output (the decoder's MLP width stands in for it)
            self.calls = [(normal(n, s.mlp),)]
            return
        import ml_dtypes
        dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[cache_dtype]
        caches = [Parameter(Tensor.from_numpy(rng.standard_normal((batch.num_slots, s.kv_heads, s.head_dim))
                                              .astype(np.float32).astype(dtype)),
                            name=f"tune_cache{i}", requires_grad=False) for i in range(2)]
        self.calls = [(q, k, v, *caches, i32(batch.slot_mapping), i32(batch.seq_index), positions,
                       i32(pad_block_tables(batch.block_tables)), i32(batch.context_lens), 16)]

    def call(self, kernels):
        if self.op in PANEL_OPS:  # the next copy of the weights: one the cache has not held since its last call
            copies = self.prepacked_calls if kernels.prepacks_weights else self.calls
            self.next_copy = (self.next_copy + 1) % len(copies)
            return [kernels.expert_linear(*args) for args in copies[self.next_copy]][-1]
        return [getattr(kernels, self.op)(*args) for args in self.calls][-1]


def column_kind(cache_dtype: str, compute_dtype: str) -> str:
    """A paged-attention column's suffix: the cache dtype, and ', bf16 math' where the products are bf16."""
    return f"[{cache_dtype}{', bf16 math' if (cache_dtype, compute_dtype) == ('bfloat16', 'bfloat16') else ''}]"


def _workloads(op: str, shapes: list[Shape], rng: np.random.Generator) -> dict[str, Workload]:
    """The columns of a sweep by name: one per shape; for paged attention, one per shape and PAGED_COLUMNS kind."""
    if op != "paged_attention":
        return {s.name: Workload(op, s, rng) for s in shapes}
    return {f"{s.name} {column_kind(cache, compute)}": Workload(op, s, rng, cache, compute)
            for s in shapes for cache, compute in PAGED_COLUMNS}


@dataclass
class Sweep:
    """One op and class: its candidates and the min time (ms) of each on each named column."""
    candidates: list[dict[str, int]]
    names: list[str]
    times: np.ndarray  # [candidate, column]

    def scores(self, columns: list[int] | None = None) -> np.ndarray:
        times = self.times if columns is None else self.times[:, columns]
        return (times / times.min(axis=0)).mean(axis=1)

    def best_by_kind(self) -> dict[str, dict]:
        """For paged attention: the candidate a sweep over one column kind alone would choose."""
        best = {}
        for cache, compute in PAGED_COLUMNS:
            kind = column_kind(cache, compute)
            columns = [i for i, name in enumerate(self.names) if name.endswith(kind)]
            best[kind.strip("[]")] = dict(self.candidates[int(self.scores(columns).argmin())])
        return best


def result_values(candidate: dict[str, int]) -> tuple:
    from kernels.sku import RESULT_PARAMS
    return tuple(candidate.get(name) for name in RESULT_PARAMS)


def choose(sweeps: dict[str, Sweep]) -> dict[str, int]:
    """The chosen candidate's index per class: the RESULT_PARAMS values whose best candidates cost least summed
    over the classes, then each class's best candidate with those values."""
    scores = {cls: sweep.scores() for cls, sweep in sweeps.items()}

    def best_with(cls: str, values: tuple) -> int:
        indices = [i for i, c in enumerate(sweeps[cls].candidates) if result_values(c) == values]
        return min(indices, key=lambda i: scores[cls][i])

    shared = set.intersection(*({result_values(c) for c in s.candidates} for s in sweeps.values()))
    values = min(sorted(shared, key=str), key=lambda v: sum(scores[cls][best_with(cls, v)] for cls in sweeps))
    return {cls: best_with(cls, values) for cls in sweeps}


def _params_with(sku: str, op: str, candidate: dict[str, int]):
    """Default parameters with `candidate` for op in both classes (a shape near the boundary must use it too)."""
    from kernels.sku import KernelParams
    params = KernelParams(sku, "tune")
    params.ops[op] = {cls: dict(candidate) for cls in SHAPES}
    return params


def sweep(sku: str, op: str, cls: str, repeat: int, rng: np.random.Generator,
          candidates: list[dict[str, int]] | None = None) -> Sweep:
    """Every candidate of op's class (default: CANDIDATES') on every column. Round-robin over candidates, minimum
    per (candidate, column): a burst of load from other processes then hits every candidate alike instead of one
    of them."""
    from kernels.registry import CpuKernels
    named = _workloads(op, shapes_of(op, cls), rng)
    candidates = candidates or CANDIDATES[op][cls]
    variants = dict.fromkeys(workload.variant for workload in named.values())
    kernel_sets = {variant: [CpuKernels(_params_with(sku, op, candidate), *variant) for candidate in candidates]
                   for variant in variants}
    times = np.full((len(candidates), len(named)), np.inf)
    for _ in range(repeat + 1):  # the first round warms up
        for c in range(len(candidates)):
            for i, workload in enumerate(named.values()):
                kernels = kernel_sets[workload.variant][c]
                times[c, i] = min(times[c, i], run_once(lambda: workload.call(kernels)))
    return Sweep(candidates, list(named), times)


def refine(sku: str, op: str, best: dict[str, int], repeat: int, rng: np.random.Generator) -> Sweep:
    """A decode sweep of `best` with each value of each REFINED_DECODE_PARAMS parameter in turn, the best value of
    one kept for the next."""
    for name, values in REFINED_DECODE_PARAMS.items():
        s = sweep(sku, op, "decode", repeat, rng, [{**best, name: value} for value in values])
        best = s.candidates[int(s.scores().argmin())]
    return s


def tune(ops: list[str], repeat: int, log: Callable[[str], None] = print) -> tuple[dict, dict]:
    """Returns (best parameters per op and class, measurements for the record)."""
    from kernels.runtime import configure_mindspore
    configure_mindspore()
    from kernels.registry import with_panel_ops
    from kernels.sku import DEFAULT_PARAMS, KernelParams, detect_sku

    sku = detect_sku()
    rng = np.random.default_rng(0)
    defaults = with_panel_ops(KernelParams(sku, "defaults")).ops
    chosen: dict[str, dict[str, dict[str, int]]] = copy.deepcopy(DEFAULT_PARAMS)
    record: dict[str, dict] = {}
    for op in ops:
        sweeps = {cls: sweep(sku, op, cls, repeat, rng) for cls in SHAPES}
        for cls, best in choose(sweeps).items():
            s = sweeps[cls]
            default = next((c for c, candidate in enumerate(s.candidates)
                            if all(defaults[op][cls].get(key) == value for key, value in candidate.items())), None)
            default_ms = None if default is None else \
                {name: round(float(s.times[default, i]), 4) for i, name in enumerate(s.names)}
            count = len(s.candidates)
            if op in PANEL_OPS and cls == "decode":
                s = refine(sku, op, s.candidates[best], repeat, rng)
                best, count = int(s.scores().argmin()), count + len(s.candidates)
            chosen.setdefault(op, {})[cls] = dict(s.candidates[best])
            record.setdefault(op, {})[cls] = {
                "best_ms": {name: round(float(s.times[best, i]), 4) for i, name in enumerate(s.names)},
                "default_ms": default_ms, "candidates": count,
            }
            log(f"{op:16} {cls:8} best {chosen[op][cls]}  ms {record[op][cls]['best_ms']}")
            if op == "paged_attention":
                record[op][cls]["best_by_kind"] = s.best_by_kind()
                log(f"{'':16} {cls:8} best per column kind {record[op][cls]['best_by_kind']}")
    return chosen, record


def write_table(path: Path, sku: str, chosen: dict, record: dict, ops: list[str]) -> None:
    import yaml

    from kernels.sku import load_params
    existing = load_params(sku=sku, path=path) if path.is_file() else None
    table_ops = copy.deepcopy(existing.ops) if existing else {}
    for op in ops:
        table_ops[op] = chosen[op]
    header = (f"# Tuned kernel parameters for {sku}, written by `cogvlm2 tune` on "
              f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.\n"
              "# ops: what the registry loads. measurements: min times (ms) of the chosen and the default\n"
              "# parameters over the representative shapes of each class (a shared machine: treat as indicative).\n")
    measurements = _existing_measurements(path)  # a partial tune (--ops) keeps the other ops' records
    measurements.update(record)
    body = yaml.safe_dump({"version": 1, "sku": sku, "ops": table_ops, "measurements": measurements},
                          sort_keys=False, width=110)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + body, encoding="utf-8")


def _existing_measurements(path: Path) -> dict:
    import yaml
    if not path.is_file():
        return {}
    return dict((yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("measurements") or {})


def run_tune(args: argparse.Namespace) -> int:
    from kernels.sku import detect_sku, tuned_table_path
    ops = args.ops.split(",") if args.ops else list(OPS)
    unknown = set(ops) - set(OPS)
    if unknown:
        raise SystemExit(f"unknown ops {sorted(unknown)}: choose from {OPS}")
    sku = detect_sku()
    out = Path(args.out) if args.out else tuned_table_path(sku)
    print(f"tuning {', '.join(ops)} on {sku} -> {out}")
    chosen, record = tune(ops, args.repeat)
    write_table(out, sku, chosen, record, ops)
    print(f"wrote {out}")
    return 0


def add_tune_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("tune", help="tune the CPU kernels on this device; writes configs/kernels/<sku>.yaml")
    p.add_argument("--ops", default=None, help=f"comma-separated subset of {','.join(OPS)} (default: all)")
    p.add_argument("--out", default=None, help="output yaml (default: configs/kernels/<sku>.yaml)")
    p.add_argument("--repeat", type=int, default=7, help="runs per measurement (the minimum is kept)")
    p.set_defaults(func=run_tune)


def main(argv: list[str] | None = None) -> int:
    """`python -m kernels.tune [--ops ...] [--out FILE]`, the same as `cogvlm2 tune`."""
    parser = argparse.ArgumentParser(prog="python -m kernels.tune")
    add_tune_parser(parser.add_subparsers(dest="command", required=True))
    argv = list(sys.argv[1:] if argv is None else argv)
    return args_func(parser.parse_args(["tune", *argv]))


def args_func(args: argparse.Namespace) -> int:
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
