"""What structured outputs cost: the per-token mask time, and the decode step at 32 sequences with 0, 8 and 32 of
them constrained by a JSON schema, measured in one run on one engine.

    python benchmarks/structured.py [--model bench] [--batch 32] [--steps 16]

The schema holds a long free-text field first (at least 400 characters), so the constrained requests stay inside it
for the whole run (a string's mask admits most of the vocabulary: the costly case for a byte-level tokenizer).
Decoding is greedy, so the step is the model plus the masks (sampling's own cost is the same with or without).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import SamplingParams  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.structured_outputs import StructuredOutputsParams  # noqa: E402

SCHEMA = {"type": "object", "required": ["description", "background", "count"], "additionalProperties": False,
          "properties": {"description": {"type": "string", "minLength": 400, "maxLength": 4000},
                         "background": {"enum": ["grey", "white", "black"]},
                         "count": {"type": "integer", "minimum": 0, "maximum": 9}}}
WORDS = "the a shape circle square triangle colour picture of and with on".split()


def mask_times(engine: LLMEngine, counts: list[int], repeats: int = 20) -> dict[int, float]:
    """ms to fill and apply the masks of n matchers inside the schema's string, on [n, vocab] logits."""
    grammars, spec = engine.grammars, StructuredOutputsParams(json=SCHEMA)
    prefix = engine.tokenizer.encode('{"description":"a picture of')
    times = {}
    for n in counts:
        matchers = [grammars.matcher(spec) for _ in range(n)]
        for matcher in matchers:
            for token in prefix:
                matcher.consume_token(token)
        logits = np.zeros((n, engine.config.vocab_size), np.float32)
        best = np.inf
        for _ in range(repeats):
            start = time.perf_counter()
            grammars.apply_masks(logits, list(range(n)), matchers)
            best = min(best, time.perf_counter() - start)
        times[n] = best * 1e3
    return times


def decode_step_ms(engine: LLMEngine, batch: int, constrained: int, steps: int, tag: str) -> float:
    """Median decode step with `constrained` of `batch` sequences under the schema."""
    rng = np.random.default_rng(batch + constrained)
    for i in range(batch):
        prompt = " ".join(rng.choice(WORDS, 48))
        so = {"json": SCHEMA} if i < constrained else None
        engine.add_request(f"{tag}-{i}", {"prompt": prompt, "template": "base"},
                           SamplingParams(temperature=0, max_tokens=steps + 16, ignore_eos=True,
                                          structured_outputs=so))
    while engine.scheduler.num_waiting or any(s.is_prefill for s in engine.scheduler.running):
        engine.step()
    assert engine.scheduler.num_running == batch
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    assert engine.scheduler.num_running == batch, "a constrained request finished inside the run"
    while engine.has_unfinished_requests():
        engine.step()
    return float(np.median(times)) * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bench")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    engine = LLMEngine(args.model, max_num_seqs=args.batch, enable_prefix_caching=False)
    masks = mask_times(engine, [1, 8, args.batch])
    for n, ms in masks.items():
        print(f"masks for {n:3d} constrained rows: {ms:.3f} ms ({ms / n * 1e3:.0f} us per row)")
    decode_step_ms(engine, args.batch, 0, 4, "warmup")
    steps = {c: decode_step_ms(engine, args.batch, c, args.steps, f"c{c}") for c in (0, 8, args.batch)}
    steps[0] = min(steps[0], decode_step_ms(engine, args.batch, 0, args.steps, "again"))  # the baseline twice
    for c, ms in steps.items():
        print(f"decode step x{args.batch} with {c:2d} constrained: {ms:.1f} ms ({ms / steps[0]:.2f}x unconstrained)")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "mask_ms": masks, "decode_step_ms": steps}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
