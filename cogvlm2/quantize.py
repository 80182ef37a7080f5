"""`cogvlm2 quantize`: a checkpoint rewritten with int8 weights, so that serving it loads them without quantizing.

The written folder is a Hugging Face layout checkpoint (safetensors, shards as the source's): every weight that
`is_quantized_weight` names is stored as int8 with its fp32 per-row scales beside it ("<name>_scale", the same round
to nearest as quantizing at load: kernels/quantization.py), every other tensor as the source stores it, and
config.json gains a `quantization_config` whose `quant_method` the engine then applies (both int8 methods read the
same weights). It is read tensor by tensor: the peak is one source tensor plus one output shard.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from cogvlm2.errors import CheckpointError, CogVLM2Error
from cogvlm2.model_source import ModelSource, resolve_model
from cogvlm2.tokenizer import TOKENIZER_FILES
from cogvlm2.weights import (DEFAULT_SHARD_SIZE, SCALE_SUFFIX, checkpoint_tensors, is_optional_tensor,
                             is_quantized_weight, save_hf_checkpoint)
from kernels.quantization import QUANTIZATIONS, quantize_int8

METHODS = tuple(q for q in QUANTIZATIONS if q)
GENERATION_CONFIG = "generation_config.json"
USAGE_ERROR = 2


def quantization_config(method: str) -> dict[str, Any]:
    """config.json's quantization_config for a checkpoint this module writes."""
    return {"quant_method": method, "bits": 8, "symmetric": True, "granularity": "per_output_channel",
            "scale_suffix": SCALE_SUFFIX, "scale_dtype": "float32"}


def quantized_tensors(source: ModelSource, progress: bool = True) -> Iterator[tuple[str, np.ndarray]]:
    """The source's tensors in checkpoint order, each quantized weight followed by its scales."""
    for name, array in checkpoint_tensors(source, progress):
        if not is_optional_tensor(name) and is_quantized_weight(name, tuple(array.shape)):
            flat = array.reshape(array.shape[0], -1)
            values, scales = quantize_int8(flat)
            yield name, values.reshape(array.shape)
            yield name + SCALE_SUFFIX, scales
        else:
            yield name, array


def write_quantized_checkpoint(source: ModelSource, out_dir: str | Path, method: str,
                               shard_size_bytes: int = DEFAULT_SHARD_SIZE, progress: bool = True) -> Path:
    if method not in METHODS:
        raise CheckpointError(f"--method must be one of {METHODS}, got {method!r}")
    if source.config.quantization is not None:
        raise CheckpointError(f"{source.name} is already quantized ({source.config.quantization}): quantize the "
                              f"checkpoint it was made from")
    hf_config = source.config.to_hf_dict()
    hf_config["quantization_config"] = quantization_config(method)
    out = save_hf_checkpoint(quantized_tensors(source, progress), out_dir, hf_config, shard_size_bytes)
    _copy_side_files(source.model_dir, out)
    return out


def _copy_side_files(model_dir: Path | None, out: Path) -> None:
    """What a model folder holds besides weights and config: the generation defaults and a tokenizer file."""
    for name in (GENERATION_CONFIG, *TOKENIZER_FILES):
        if model_dir is not None and (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out / name)


def add_quantize_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("quantize", help="write an int8-weight checkpoint that loads without quantizing")
    parser.add_argument("--input", required=True, help="Hugging Face checkpoint folder, MindFormers .ckpt or preset")
    parser.add_argument("--output", required=True, help="output folder (must not hold a checkpoint yet)")
    parser.add_argument("--method", required=True, choices=METHODS, help="the quantization it is served with")
    parser.add_argument("--config", default=None, help="a MindFormers yaml, for a .ckpt without config.json")
    parser.add_argument("--shard_size_mb", type=int, default=DEFAULT_SHARD_SIZE // 10**6,
                        help="largest shard in MB (10^6 bytes)")
    parser.set_defaults(func=run_quantize)
    return parser


def run_quantize(args: argparse.Namespace) -> int:
    if args.shard_size_mb <= 0:
        print(f"error: --shard_size_mb must be positive, got {args.shard_size_mb}", file=sys.stderr)
        return USAGE_ERROR
    try:
        source = resolve_model(args.input, args.config)
        out = write_quantized_checkpoint(source, args.output, args.method, args.shard_size_mb * 10**6)
    except CogVLM2Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({args.method}: int8 weights with per-output-channel scales)")
    return 0

