"""Memory of loading a checkpoint: the loader's peak against the float32 size, the model's resident memory per
`dtype`, and (from the tensor shapes alone, nothing loaded) the resident weights per dtype and tensor-parallel size.

    python benchmarks/loading.py [--preset bench] [--dtype bf16] [--formats hf,ckpt] [--json OUT]
    python benchmarks/loading.py --preset bench --engine-dtypes float32-widened,float32,bfloat16
    python benchmarks/loading.py --preset cogvlm2-llama3-chat-19b --sizes float32-widened,float32,bfloat16 --tp 1,2,4,8

Writes the preset's random checkpoint (HF layout; and its MindFormers .ckpt for `ckpt`) to a temp dir, then loads
each in a fresh process and reports the rise of peak resident memory (ru_maxrss) over the process's baseline just
before loading (imports, MindSpore included, are in the baseline). `--engine-dtypes` builds the model the way the
engine does for each dtype ("float32-widened": every weight widened to float32, what the engine did before the
dtype work) and reports the resident rise after loading.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # before this folder, whose kernels.py would shadow

GB = 1e9


@dataclass
class LoadResult:
    format: str
    checkpoint_bytes: int
    num_tensors: int
    fp32_bytes: int
    baseline_rss_bytes: int
    peak_rise_bytes: int
    final_rise_bytes: int
    load_seconds: float

    @property
    def ratio(self) -> float:
        return self.peak_rise_bytes / self.fp32_bytes


def _rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def child(checkpoint: str) -> None:
    """Runs in the fresh process: load, then print the measurements as JSON."""
    import mindspore  # noqa: F401  (the model process has it loaded anyway; keep it in the baseline)

    from cogvlm2.model_source import resolve_model
    from cogvlm2.weights import load_weights

    source = resolve_model(checkpoint)
    baseline = _max_rss_bytes()
    start = time.perf_counter()
    weights = load_weights(source, progress=False)
    seconds = time.perf_counter() - start
    peak = _max_rss_bytes()
    print(json.dumps({"num_tensors": len(weights.tensors),
                      "fp32_bytes": sum(t.nbytes for t in weights.tensors.values()),
                      "baseline_rss_bytes": baseline, "peak_rise_bytes": peak - baseline,
                      "final_rise_bytes": _rss_bytes() - baseline, "load_seconds": seconds}))


def child_model(checkpoint: str, dtype: str) -> None:
    """Runs in a fresh process: the model as the engine builds it for `dtype`; prints RSS rises as JSON."""
    import mindspore  # noqa: F401
    import numpy as np

    from cogvlm2.model import CogVLM2Model
    from cogvlm2.model_source import resolve_model
    from cogvlm2.precision import NUMPY_DTYPES
    from kernels.registry import get_kernels

    source = resolve_model(checkpoint)
    base, _, quantization = dtype.partition("+")  # e.g. bfloat16+w8a16
    compute = "float32" if base == "float32-widened" else base
    storage = np.dtype(np.float32) if base == "float32-widened" else (
        None if compute == "float32" else NUMPY_DTYPES[compute])
    kernels = get_kernels("auto", compute_dtype=compute, quantization=quantization or None)
    baseline = _max_rss_bytes()
    start = time.perf_counter()
    model = CogVLM2Model.from_source(source, kernels, storage)
    seconds = time.perf_counter() - start
    print(json.dumps({"dtype": dtype, "peak_rise_bytes": _max_rss_bytes() - baseline,
                      "resident_rise_bytes": _rss_bytes() - baseline, "load_seconds": seconds,
                      "layers": len(model.language.layers)}))


def engine_dtypes(preset: str, dtypes: list[str]) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="cogvlm2-loading-") as tmp:
        subprocess.run([sys.executable, __file__, "--write", tmp, "--preset", preset, "--dtype", "bf16",
                        "--formats", "hf"], check=True)
        results = []
        for dtype in dtypes:
            out = subprocess.run([sys.executable, __file__, "--child-model", str(Path(tmp) / preset), "--model-dtype",
                                  dtype], check=True, capture_output=True, text=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = results[0]["resident_rise_bytes"]
    print(f"preset {preset} (bf16 checkpoint): the model's resident memory after loading, per dtype")
    print(f"{'dtype':<18}{'resident GB':>12}{'peak GB':>9}{'vs ' + dtypes[0]:>22}{'load s':>8}")
    for r in results:
        print(f"{r['dtype']:<18}{r['resident_rise_bytes'] / GB:>12.3f}{r['peak_rise_bytes'] / GB:>9.3f}"
              f"{r['resident_rise_bytes'] / base:>21.2f}x{r['load_seconds']:>8.2f}")
    return results


def resident_sizes(preset: str, dtypes: list[str], tp_sizes: list[int]) -> list[dict]:
    """Weights held per device, from the checkpoint's tensor shapes alone (the preset's, or an HF folder's
    safetensors headers): GEMM weights and the embedding in the storage dtype, the rest in float32; with a
    "+w8a16" / "+w8a8" suffix the quantized weights as int8 with one fp32 scale per output row. Also the vision
    tower's (encoder + adapter) share, which text-only serving does not load."""
    from math import prod

    from cogvlm2.model_source import resolve_model
    from cogvlm2.parallel import shard_layout, shard_shape
    from cogvlm2.precision import checkpoint_dtype, held_in_storage_dtype, weight_storage
    from cogvlm2.weights import hf_weight_shapes, is_optional_tensor, is_quantized_weight

    config = resolve_model(preset).config
    shapes = {n: s for n, s in hf_weight_shapes(config).items() if not is_optional_tensor(n)}
    rows = []
    for dtype in dtypes:
        base, _, quantization = dtype.partition("+")
        itemsize = 4 if base == "float32-widened" else weight_storage(base, checkpoint_dtype(config)).itemsize

        def tensor_bytes(name: str, shape: tuple[int, ...]) -> int:
            if quantization and is_quantized_weight(name, shape):
                return prod(shape) + 4 * shape[0]
            return prod(shape) * (itemsize if held_in_storage_dtype(name, shape) else 4)
        for tp in tp_sizes:
            layout = shard_layout(config, tp, 0)
            sized = {n: tensor_bytes(n, shard_shape(n, s, config, layout)) for n, s in shapes.items()}
            rows.append({"dtype": dtype, "tensor_parallel_size": tp, "bytes_per_device": sum(sized.values()),
                         "vision_bytes_per_device": sum(b for n, b in sized.items() if n.startswith("model.vision."))})
    print(f"preset {preset}: weights resident per device, from the shapes alone (GiB; in brackets the vision tower's)")
    print(f"{'dtype':<16}" + "".join(f"{'TP=' + str(tp):>18}" for tp in tp_sizes))
    for dtype in dtypes:
        print(f"{dtype:<16}" + "".join(f"{r['bytes_per_device'] / 2 ** 30:>10.2f} ({r['vision_bytes_per_device'] / 2 ** 30:.2f})"
                                       for r in rows if r["dtype"] == dtype))
    return rows


def measure(fmt: str, checkpoint: Path) -> LoadResult:
    out = subprocess.run([sys.executable, __file__, "--child", str(checkpoint)], check=True, capture_output=True,
                         text=True)
    size = sum(p.stat().st_size for p in checkpoint.iterdir()) if checkpoint.is_dir() else checkpoint.stat().st_size
    return LoadResult(format=fmt, checkpoint_bytes=size, **json.loads(out.stdout.strip().splitlines()[-1]))


def print_table(preset: str, dtype: str, results: list[LoadResult]) -> None:
    print(f"preset {preset}, stored {dtype}; sizes in GB (1e9 bytes), memory = ru_maxrss rise over baseline")
    print(f"{'format':<7}{'tensors':>8}{'on disk':>9}{'fp32':>8}{'peak':>8}{'peak/fp32':>11}{'after':>8}{'load s':>8}")
    for r in results:
        print(f"{r.format:<7}{r.num_tensors:>8}{r.checkpoint_bytes / GB:>9.3f}{r.fp32_bytes / GB:>8.3f}"
              f"{r.peak_rise_bytes / GB:>8.3f}{r.ratio:>11.2f}{r.final_rise_bytes / GB:>8.3f}{r.load_seconds:>8.2f}")


def write_checkpoints(preset: str, dtype: str, out_dir: str, with_ckpt: bool) -> None:
    """Runs in its own process, so the measuring processes are started from a small parent: a child inherits
    its parent's peak RSS in ru_maxrss across exec."""
    from cogvlm2.model_source import resolve_model
    from cogvlm2.weights import make_random_checkpoint, write_mindformers_ckpt

    hf_dir = make_random_checkpoint(resolve_model(preset).config, Path(out_dir) / preset, seed=0, dtype=dtype)
    if with_ckpt:
        write_mindformers_ckpt(hf_dir, Path(out_dir) / "ckpt" / f"{preset}.ckpt", dtype, progress=False)


def run(preset: str, dtype: str, formats: list[str]) -> list[LoadResult]:
    results = []
    with tempfile.TemporaryDirectory(prefix="cogvlm2-loading-") as tmp:
        subprocess.run([sys.executable, __file__, "--write", tmp, "--preset", preset, "--dtype", dtype,
                        "--formats", ",".join(formats)], check=True)
        if "hf" in formats:
            results.append(measure("hf", Path(tmp) / preset))
        if "ckpt" in formats:
            results.append(measure("ckpt", Path(tmp) / "ckpt" / f"{preset}.ckpt"))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="bench")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--formats", default="hf,ckpt", help="comma-separated: hf (safetensors), ckpt (MindFormers)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--engine-dtypes", default=None,
                        help="comma-separated dtypes to build the model in (float32-widened, float32, bfloat16, "
                             "float16): resident memory after loading a bf16 checkpoint")
    parser.add_argument("--sizes", default=None, help="comma-separated dtypes: resident weights from shapes alone")
    parser.add_argument("--tp", default="1,2,4,8", help="tensor-parallel sizes for --sizes")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-model", help=argparse.SUPPRESS)
    parser.add_argument("--model-dtype", help=argparse.SUPPRESS)
    parser.add_argument("--write", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    if args.child_model:
        child_model(args.child_model, args.model_dtype)
        return 0
    if args.sizes or args.engine_dtypes:
        payload = {}
        if args.sizes:
            payload["sizes"] = resident_sizes(args.preset, args.sizes.split(","), [int(t) for t in args.tp.split(",")])
        if args.engine_dtypes:
            payload["engine"] = engine_dtypes(args.preset, args.engine_dtypes.split(","))
        if args.json:
            Path(args.json).write_text(json.dumps(payload, indent=2))
        return 0
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if not formats or set(formats) - {"hf", "ckpt"}:
        parser.error(f"--formats must list hf and/or ckpt, got {args.formats!r}")
    if args.write:
        write_checkpoints(args.preset, args.dtype, args.write, "ckpt" in formats)
        return 0
    results = run(args.preset, args.dtype, formats)
    print_table(args.preset, args.dtype, results)
    if args.json:
        payload = {"preset": args.preset, "dtype": args.dtype,
                   "results": [{**asdict(r), "ratio": r.ratio} for r in results]}
        Path(args.json).write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
