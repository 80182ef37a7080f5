"""Ascend kernel benchmarks (an NPU only; scripts/ascend_first_run.sh runs them): fused rope + KV write + paged
attention of one 19B layer on one card (32 heads, 8 KV heads, head_dim 128) through each Ascend kernel set and the
reference composites, at decode, prefill and mixed shapes, in the SoC's dtype.

    python benchmarks/ascend_kernels.py [--json OUT] [--repeat N] [--block-size 128]

Calls are timed with a device synchronisation around each; the minimum over `repeat` rounds is kept. The figures
decide the kernel table's ascend_backends per op (configs/kernels/ascend-<family>.yaml).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would shadow the `kernels` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402

from cogvlm2.runtime import configure_mindspore  # noqa: E402
from kernels.device import DeviceUnavailableError  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
# (name, context lengths, this step's tokens per sequence)
SHAPES = [("decode 32 x 512", [512] * 32, [1] * 32), ("prefill 2048", [2048], [2048]),
          ("mixed 31 decodes + chunk 512 at 1024", [512] * 31 + [1536], [1] * 31 + [512])]


def kernel_sets(device, dtype: str) -> dict:
    from kernels import sku
    from kernels.ascend import AscendKernels
    from kernels.ascend_build import installed_package
    from kernels.registry import get_kernels
    sets = {"reference": get_kernels("reference", compute_dtype=dtype, device=device)}
    for choice in ("builtin", "custom"):
        if choice == "custom" and installed_package() is None:
            print("ascend-custom: not installed (python -m kernels.ascend_build), skipped", flush=True)
            continue
        sets[f"ascend-{choice}"] = AscendKernels(sku.load_params(), dtype,
                                                 dict.fromkeys(sku.ASCEND_CHOICE_OPS, choice), device.soc_family)
    return sets


def time_case(kernels, context_lens, new_tokens, block_size: int, dtype: str, repeat: int) -> float:
    import mindspore
    from mindspore import Parameter, Tensor

    from cogvlm2.precision import NUMPY_DTYPES
    from kernels.reference import make_paged_batch
    rng = np.random.default_rng(0)
    batch = make_paged_batch(context_lens, new_tokens, block_size, rng, shuffle=True)
    n = batch.slot_mapping.shape[0]
    num_blocks = batch.num_slots // block_size
    shape = kernels.kv_cache_shape(num_blocks, block_size, KV_HEADS, HEAD_DIM)
    store = NUMPY_DTYPES[dtype] if kernels.backend != "reference" else np.float32
    caches = [kernels.place_kv_cache(Parameter(Tensor.from_numpy(np.zeros(shape, store)), name=f"c{i}",
                                               requires_grad=False)) for i in range(2)]
    qkv = Tensor(rng.standard_normal((n, HEADS + 2 * KV_HEADS, HEAD_DIM)).astype(np.float32))
    positions = Tensor(batch.token_position.astype(np.int32))
    angles = np.arange(max(context_lens) + 1)[:, None] / 10000 ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    table = np.concatenate([angles, angles], -1)
    cos, sin = Tensor(np.cos(table).astype(np.float32)), Tensor(np.sin(table).astype(np.float32))
    best = math.inf
    for _ in range(repeat):
        mindspore.runtime.synchronize()
        start = time.perf_counter()
        kernels.paged_attention(qkv, None, None, *caches, batch.slot_mapping, batch.seq_index, batch.token_position,
                                batch.block_tables, batch.context_lens, block_size, rope=(positions, cos, sin))
        mindspore.runtime.synchronize()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--block-size", type=int, default=128)
    args = parser.parse_args(argv)
    try:
        device = configure_mindspore("ascend")
    except DeviceUnavailableError as error:
        print(f"ascend kernel benchmarks: {error}", file=sys.stderr)
        return 2
    dtype = "bfloat16" if device.supports_bf16 else "float16"
    results = []
    for name, kernels in kernel_sets(device, dtype).items():
        for shape, context_lens, new_tokens in SHAPES:
            ms = time_case(kernels, context_lens, new_tokens, args.block_size, dtype, args.repeat)
            results.append({"kernels": name, "shape": shape, "dtype": dtype, "block_size": args.block_size,
                            "ms": round(ms, 3), "device": device.describe()})
            print(f"{name:16s} {shape:40s} {ms:9.3f} ms", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
