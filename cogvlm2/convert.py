"""`convert` (HF checkpoint -> MindFormers .ckpt, with MindFormers' convert_weight.py flags) and `make-random`
(a seeded random checkpoint in the HF layout) sub-commands."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cogvlm2.errors import CogVLM2Error
from cogvlm2.model_source import RANDOM_WEIGHTS_SEED, preset_names, resolve_model
from cogvlm2.weights import DEFAULT_SHARD_SIZE, DTYPES, make_random_checkpoint, write_mindformers_ckpt

SUPPORTED_MODAL = "image"
SUPPORTED_MODEL = "cogvlm2"
USAGE_ERROR = 2


def add_convert_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("convert", help="convert a Hugging Face CogVLM2 checkpoint to a MindFormers .ckpt")
    parser.add_argument("--modal", default=SUPPORTED_MODAL, help="only 'image' (CogVLM2 image chat)")
    parser.add_argument("--model", default=SUPPORTED_MODEL, help="only 'cogvlm2'")
    parser.add_argument("--input_path", required=True, help="Hugging Face checkpoint folder (or a preset name)")
    parser.add_argument("--output_path", required=True, help="the .ckpt file to write")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="dtype of the written weights")
    parser.set_defaults(func=run_convert)
    return parser


def add_make_random_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("make-random", help="write a seeded random checkpoint (Hugging Face layout)")
    parser.add_argument("--preset", required=True, help=f"model size: one of {preset_names()}")
    parser.add_argument("--out", required=True, help="output folder (must not hold a checkpoint yet)")
    parser.add_argument("--seed", type=int, default=RANDOM_WEIGHTS_SEED)
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--shard_size_mb", type=int, default=DEFAULT_SHARD_SIZE // 10**6,
                        help="largest shard in MB (10^6 bytes); a smaller checkpoint is one model.safetensors")
    parser.set_defaults(func=run_make_random)
    return parser


def _fail(message: str, code: int = 1) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def run_convert(args: argparse.Namespace) -> int:
    if args.modal != SUPPORTED_MODAL:
        return _fail(f"--modal {args.modal!r} is not supported: only --modal {SUPPORTED_MODAL} "
                     f"(CogVLM2 image chat) can be converted", USAGE_ERROR)
    if args.model != SUPPORTED_MODEL:
        return _fail(f"--model {args.model!r} is not supported: this converter handles --model {SUPPORTED_MODEL} "
                     f"only", USAGE_ERROR)
    if Path(args.output_path).suffix != ".ckpt":
        return _fail(f"--output_path must end with .ckpt, got {args.output_path}", USAGE_ERROR)
    try:
        out = write_mindformers_ckpt(args.input_path, args.output_path, args.dtype)
    except CogVLM2Error as e:
        return _fail(str(e))
    print(f"wrote {out} ({args.dtype})")
    return 0


def run_make_random(args: argparse.Namespace) -> int:
    if args.preset not in preset_names():
        return _fail(f"unknown --preset {args.preset!r}; presets: {preset_names()}", USAGE_ERROR)
    if args.seed < 0:
        return _fail(f"--seed must be >= 0, got {args.seed}", USAGE_ERROR)
    if args.shard_size_mb <= 0:
        return _fail(f"--shard_size_mb must be positive, got {args.shard_size_mb}", USAGE_ERROR)
    try:
        config = resolve_model(args.preset).config
        out = make_random_checkpoint(config, args.out, args.seed, args.dtype, args.shard_size_mb * 10**6)
    except CogVLM2Error as e:
        return _fail(str(e))
    print(f"wrote {out} (preset {args.preset}, seed {args.seed}, {args.dtype})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cogvlm2", description="CogVLM2 checkpoint conversion")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_convert_parser(subparsers)
    add_make_random_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
