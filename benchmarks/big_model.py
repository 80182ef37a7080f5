"""The real-size model on this machine: the cogvlm2-llama3-chat-19b preset (seeded random weights in the real
shapes, streamed tensor by tensor through the same loader as a checkpoint, nothing written to disk), loaded with a
weight quantization and, by default, without the vision tower; then resident memory, decode steps against the
bandwidth bound of the bytes they stream, and one text prompt end to end.

    python benchmarks/big_model.py [--model cogvlm2-llama3-chat-19b] [--quantization w8a16] [--with-vision]

With --with-vision the vision tower is loaded too and one image at the model's size is timed to its first token.

Takes several minutes (generating and quantizing ~15B random weights). Not a CI test.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.roofline import MachineLimits, measure_bandwidth, run_decode  # noqa: E402
from engine import SamplingParams  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402

GB = 2 ** 30


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cogvlm2-llama3-chat-19b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quantization", default="w8a16")
    p.add_argument("--with-vision", action="store_true", help="load the vision tower too")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    before = _rss_bytes()
    start = time.perf_counter()
    engine = LLMEngine(args.model, dtype=args.dtype, quantization=args.quantization or None,
                       limit_mm_per_prompt=None if args.with_vision else {"image": 0}, max_num_seqs=16,
                       max_num_batched_tokens=512, max_model_len=4096 if args.with_vision else 1024,
                       kv_cache_memory_gb=1,
                       enable_prefix_caching=False)
    load_s = time.perf_counter() - start
    report = {"model": args.model, "dtype": args.dtype, "quantization": args.quantization,
              "vision_tower": args.with_vision, "load_s": round(load_s, 1),
              "peak_rss_gb": round(_peak_rss_bytes() / GB, 2), "resident_gb": round(_rss_bytes() / GB, 2),
              "resident_rise_gb": round((_rss_bytes() - before) / GB, 2)}
    print(f"loaded in {load_s:.0f} s: peak RSS {report['peak_rss_gb']} GiB, resident {report['resident_gb']} GiB "
          f"(+{report['resident_rise_gb']} GiB over the process before loading)", flush=True)

    limits = MachineLimits(1.0, "not measured (decode is bandwidth-bound)", round(measure_bandwidth(), 1), [])
    report["bandwidth_gbs"] = limits.bandwidth_gbs
    report["decode"] = []
    for batch in (int(b) for b in args.batches.split(",")):
        r = run_decode(engine, batch, args.context, args.steps, limits)
        print(f"decode x{batch} at context {args.context}: {r.measured_ms:.0f} ms a step; it streams {r.gbytes:.2f} "
              f"GB, bound {r.gbytes / limits.bandwidth_gbs * 1000:.0f} ms at {limits.bandwidth_gbs} GB/s "
              f"({r.gbytes / limits.bandwidth_gbs * 1000 / r.measured_ms:.0%} of it)", flush=True)
        report["decode"].append({"batch": batch, "step_ms": r.measured_ms, "gbytes": r.gbytes,
                                 "bound_ms": round(r.gbytes / limits.bandwidth_gbs * 1000, 1)})

    start = time.perf_counter()
    engine.add_request("text", {"prompt": "Describe a sunny day at the beach.", "template": "chat"},
                       SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    tokens = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += out.outputs[0].token_ids if out.outputs else []
    report["end_to_end_32_tokens_s"] = round(time.perf_counter() - start, 2)
    print(f"one text prompt, 32 tokens end to end: {report['end_to_end_32_tokens_s']} s ({len(tokens)} tokens)")
    if args.with_vision:
        report["image"] = time_one_image(engine)
    report["peak_rss_end_gb"] = round(_peak_rss_bytes() / GB, 2)
    print(json.dumps(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    engine.shutdown()
    return 0


def time_one_image(engine: LLMEngine) -> dict:
    """One image at the model's size (1344x1344 for the 19B) with a question, to its first answer token: the vision
    encoder's time, and the whole request's (encoder, then the ~2.3k-token prefill)."""
    import numpy as np
    from PIL import Image
    size = engine.config.vision.image_size
    pixels = (np.indices((size, size)).sum(0) % 256).astype(np.uint8)
    image = Image.fromarray(np.stack([pixels, pixels[::-1], pixels.T], -1))
    engine.timer.reset()
    start = time.perf_counter()
    engine.add_request("image", {"prompt": "What is in the image?", "image": image},
                       SamplingParams(temperature=0, max_tokens=1))
    errors = []
    while engine.has_unfinished_requests():
        errors += [out.error for out in engine.step() if out.error]
    if errors:
        raise RuntimeError(f"the image request failed: {errors[0]}")
    result = {"image_size": size, "first_token_s": round(time.perf_counter() - start, 1),
              "vision_encoder_s": round(engine.timer.seconds.get("vision", 0.0), 1),
              "peak_rss_gb": round(_peak_rss_bytes() / GB, 2)}
    print(f"one {size}x{size} image to its first token: {result['first_token_s']} s, of which the vision encoder "
          f"{result['vision_encoder_s']} s; peak RSS {result['peak_rss_gb']} GiB", flush=True)
    return result


if __name__ == "__main__":
    sys.exit(main())
