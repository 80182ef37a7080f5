"""Peak memory of loading a checkpoint into float32 arrays, against the final float32 size.

    python benchmarks/loading.py [--preset bench] [--dtype bf16] [--formats hf,ckpt] [--json OUT]

Writes the preset's random checkpoint (HF layout; and its MindFormers .ckpt for `ckpt`) to a temp dir, then loads
each in a fresh process with `load_weights` and reports the rise of peak resident memory (ru_maxrss) over the
process's baseline just before loading (imports, MindSpore included, are in the baseline).
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
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--write", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child)
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
