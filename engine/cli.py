"""The `cogvlm2` command line: generate, convert, make-random (and more sub-commands as the engine grows)."""
from __future__ import annotations

import argparse
import json
import sys

from cogvlm2.errors import CogVLM2Error


def _add_generate_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate a reply to one prompt (optionally with an image)")
    p.add_argument("--model", default=None, help="checkpoint folder, .ckpt file or preset (default: demo)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model or tokenizer.json (default: the model's, "
                                                     "else Llama-3's from llama-models)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", default=None, help="image file")
    p.add_argument("--history", default=None, help='JSON list of [question, answer] pairs')
    p.add_argument("--template", default=None, choices=["chat", "vqa", "base"])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_run_generate)


def _parse_history(raw: str | None) -> list | None:
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise CogVLM2Error(f"--history is not valid JSON: {e}") from e


def _run_generate(args: argparse.Namespace) -> int:
    from cogvlm2.generate import SimplePipeline
    pipeline = SimplePipeline(args.model, tokenizer=args.tokenizer)
    out = pipeline.generate(args.prompt, image=args.image, history=_parse_history(args.history),
                            template=args.template, max_tokens=args.max_tokens, temperature=args.temperature,
                            seed=args.seed, ignore_eos=args.ignore_eos)
    print(json.dumps(out.to_dict()) if args.json else out.text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cogvlm2", description="CogVLM2 inference engine on MindSpore")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_generate_parser(subparsers)
    from cogvlm2.convert import add_convert_parser, add_make_random_parser
    add_convert_parser(subparsers)
    add_make_random_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CogVLM2Error, ValueError, FileNotFoundError) as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
