"""What a `--dtypes` entry of roofline.py and throughput.py runs: an engine dtype (auto, float32, bfloat16,
float16), optionally with a weight quantization after a "+" (bfloat16+w8a16) and a KV-cache dtype after "+kv:"
(bfloat16+kv:int8, bfloat16+w8a16+kv:int8), or "float32-weights": dtype float32 over a float32 copy of the model,
i.e. every weight widened to and stored in float32, as the engine held every checkpoint before it kept 16-bit
weights as stored. The copy of a preset's random weights is written to a temporary folder (~1 GB for bench) and
deleted after the run."""
from __future__ import annotations

import tempfile
from contextlib import contextmanager
from typing import Iterator

from cogvlm2.model_source import resolve_model
from cogvlm2.weights import make_random_checkpoint

FLOAT32_WEIGHTS = "float32-weights"
KV_PREFIX = "kv:"


def entries(dtypes: str, quantizations: str | None, kv_cache_dtypes: str | None = None) -> list[str]:
    """The --dtypes entries crossed with --quantizations ("none" for unquantized) and --kv-cache-dtypes ("auto":
    the compute dtype's): bfloat16 x none,w8a16 x auto,int8 -> bfloat16, bfloat16+kv:int8, bfloat16+w8a16, ..."""
    quants = (quantizations or "none").split(",")
    kvs = (kv_cache_dtypes or "auto").split(",")
    out = []
    for d in dtypes.split(","):
        for q in quants:
            for kv in kvs:
                parts = [d] + ([q] if q != "none" else []) + ([KV_PREFIX + kv] if kv != "auto" else [])
                out.append(d if d == FLOAT32_WEIGHTS else "+".join(parts))
    return list(dict.fromkeys(out))


def engine_arguments(entry: str) -> dict:
    """dtype, quantization and kv_cache_dtype of an entry other than float32-weights."""
    dtype, *rest = entry.split("+")
    kv = [part.removeprefix(KV_PREFIX) for part in rest if part.startswith(KV_PREFIX)]
    quantization = [part for part in rest if not part.startswith(KV_PREFIX)]
    return {"dtype": dtype, "quantization": quantization[0] if quantization else None,
            "kv_cache_dtype": kv[0] if kv else "auto"}


@contextmanager
def engine_model(model: str, entry: str) -> Iterator[tuple[str, dict]]:
    """(the engine's model argument, its dtype and quantization arguments) for one --dtypes entry."""
    if entry != FLOAT32_WEIGHTS:
        yield model, engine_arguments(entry)
        return
    source = resolve_model(model)
    if source.checkpoint is not None:
        raise ValueError(f"{FLOAT32_WEIGHTS} compares presets (random weights) only, not the checkpoint {model}")
    with tempfile.TemporaryDirectory(prefix="cogvlm2-float32-weights-") as folder:
        print(f"[{entry}] writing a float32 copy of {model} to {folder}", flush=True)
        make_random_checkpoint(source.config, folder, source.random_seed, dtype="fp32")
        yield folder, {"dtype": "float32", "quantization": None, "kv_cache_dtype": "auto"}
