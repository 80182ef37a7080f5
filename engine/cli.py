"""The `cogvlm2` command line.

    cogvlm2 generate --model DIR_OR_PRESET --prompt TEXT [--image PATH] [--json] ...   (runs on the engine)
    cogvlm2 generate --prompts-file FILE.jsonl                                           (many requests together)
    cogvlm2 --config YAML --run_mode predict --predict_data IMAGE TEXT --modal_type image text --load_checkpoint CKPT
    cogvlm2 serve MODEL [--config args.yaml] [--model-config model.yaml] ...            (vLLM's `vllm serve`)
    cogvlm2 bench throughput | latency | serve ...                                       (vLLM's `vllm bench`)
    cogvlm2 convert ... / cogvlm2 make-random ...
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cogvlm2.errors import CogVLM2Error, InputError
from engine.config import add_cli_args, engine_kwargs
from engine.config_file import CONFIG_FILE_DEST, add_config_file_arg, config_file_tokens
from engine.entrypoints.settings import DEFAULT_MAX_BODY_BYTES
from engine.metrics import add_metrics_cli_args

SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
                 "ignore_eos", "min_tokens", "repetition_penalty", "presence_penalty", "frequency_penalty",
                 "logprobs")


def _add_generate_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate replies (one prompt, or many from a JSONL file)")
    add_cli_args(p)
    p.add_argument("--prompt", default=None)
    p.add_argument("--image", default=None, help="image file")
    p.add_argument("--history", default=None, help='JSON list of [question, answer] pairs')
    p.add_argument("--template", default=None, choices=["chat", "vqa", "base"])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--request-seed", type=int, default=None, help="seed of the requests here (--seed is the "
                                                                  "engine's, which unseeded requests draw from)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object per request")
    p.add_argument("--prompts-file", default=None, help="JSONL: one request per line, keys prompt, image, "
                                                        "history, template and sampling fields")
    p.add_argument("--simple", action="store_true", help="use the simple one-request path (the oracle)")
    # MindFormers' run_mindformer.py flags.
    p.add_argument("--config", default=None, help="MindFormers-style yaml (model sizes): --model-config's "
                                                  "run_mindformer.py spelling")
    p.add_argument("--run_mode", default="predict", choices=["predict"])
    p.add_argument("--predict_data", nargs="+", default=None, help="IMAGE TEXT, in --modal_type order")
    p.add_argument("--modal_type", nargs="+", default=None, help="e.g. image text")
    p.add_argument("--load_checkpoint", default=None, help="MindFormers .ckpt (or an HF folder)")
    p.set_defaults(func=_run_generate)


def _parse_history(raw: str | None) -> list | None:
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise InputError(f"--history is not valid JSON: {e}") from e


def _apply_mindformers_flags(args: argparse.Namespace) -> None:
    if args.load_checkpoint:
        args.model = args.load_checkpoint
    if args.config:
        if args.config_yaml and Path(args.config_yaml) != Path(args.config):
            raise InputError(f"--config {args.config} and --model-config {args.config_yaml} disagree: give one")
        args.config_yaml = args.config
    if args.predict_data is None:
        return
    modal = args.modal_type or (["image", "text"] if len(args.predict_data) == 2 else ["text"])
    if len(modal) != len(args.predict_data):
        raise InputError(f"--predict_data has {len(args.predict_data)} items but --modal_type names {len(modal)}")
    for kind, value in zip(modal, args.predict_data):
        if kind == "image":
            args.image = value
        elif kind == "text":
            args.prompt = value
        else:
            raise InputError(f"--modal_type '{kind}' is not supported (image, text)")


def _requests_from_args(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.prompts_file:
        return _read_prompts_file(args.prompts_file, args)
    if args.prompt is None:
        raise InputError("give --prompt TEXT, --predict_data, or --prompts-file FILE")
    request = {"prompt": args.prompt, "image": args.image, "history": _parse_history(args.history),
               "template": args.template}
    return [{**request, **_default_sampling(args)}]


def _default_sampling(args: argparse.Namespace) -> dict[str, Any]:
    return {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "top_k": args.top_k, "seed": args.request_seed, "ignore_eos": args.ignore_eos}


def _read_prompts_file(path: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    requests = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
    except OSError as e:
        raise InputError(f"--prompts-file cannot be read: {e}") from e
    for number, line in enumerate(lines, 1):
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path} line {number}: not valid JSON ({e})") from e
        if isinstance(item, str):
            item = {"prompt": item}
        if not isinstance(item, dict):
            raise InputError(f"{path} line {number}: expected a JSON object or string")
        requests.append({**_default_sampling(args), **item})
    return requests


def _split_request(request: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    prompt = {k: v for k, v in request.items() if k not in SAMPLING_KEYS and v is not None}
    sampling = {k: v for k, v in request.items() if k in SAMPLING_KEYS and v is not None}
    return prompt, sampling


def _result_json(out) -> dict[str, Any]:
    completion = out.outputs[0]
    result = {"prompt_token_ids": out.prompt_token_ids, "token_ids": completion.token_ids,
              "text": completion.text, "finish_reason": completion.finish_reason}
    if out.error:
        result["error"] = out.error
    return result


def _run_generate(args: argparse.Namespace) -> int:
    _apply_mindformers_flags(args)
    requests = _requests_from_args(args)
    if args.simple:
        return _run_simple(args, requests)
    from engine.distributed import WorkerFailure
    from engine.llm import LLM
    prompts, params = zip(*(_split_request(r) for r in requests))
    try:
        llm = LLM(args.model, **engine_kwargs(args))
        try:
            outputs = llm.generate(list(prompts), list(params), use_tqdm=len(requests) > 1 and sys.stderr.isatty())
        finally:
            llm.shutdown()
    except WorkerFailure as e:  # a tensor-parallel worker failed, died or hung
        print(f"error: WorkerFailure: {e}", file=sys.stderr)
        return 1
    as_json = args.json or args.prompts_file is not None
    for out in outputs:
        print(json.dumps(_result_json(out)) if as_json else (out.outputs[0].text if not out.error
                                                             else f"error: {out.error}"))
    return 0 if all(out.error is None for out in outputs) else 1


def _run_simple(args: argparse.Namespace, requests: list[dict[str, Any]]) -> int:
    from cogvlm2.generate import SimplePipeline
    pipeline = SimplePipeline(args.model, tokenizer=args.tokenizer, config_yaml=args.config_yaml)
    for request in requests:
        prompt, sampling = _split_request(request)
        out = pipeline.generate(prompt["prompt"], image=prompt.get("image"), history=prompt.get("history"),
                                template=prompt.get("template"), max_tokens=sampling.get("max_tokens", 64),
                                temperature=sampling.get("temperature", 0.0), seed=sampling.get("seed"),
                                ignore_eos=sampling.get("ignore_eos", False))
        print(json.dumps(out.to_dict()) if args.json or args.prompts_file else out.text)
    return 0


def _add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (see engine/entrypoints/)")
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="checkpoint folder, .ckpt file or preset (or --model; default: demo)")
    add_cli_args(p)
    add_config_file_arg(p)
    p.add_argument("--host", default=None, help="address to listen on (default: all interfaces, as vLLM; "
                                                "127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* (default: the "
                                                   "VLLM_API_KEY environment variable; unset: no key)")
    p.add_argument("--metrics-require-key", action="store_true", help="require the API key on /metrics too")
    p.add_argument("--allowed-origins", type=json.loads, default=["*"], help='CORS origins, JSON (default ["*"])')
    p.add_argument("--allowed-methods", type=json.loads, default=["*"], help="CORS methods, JSON")
    p.add_argument("--allowed-headers", type=json.loads, default=["*"], help="CORS headers, JSON")
    p.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    p.add_argument("--allowed-local-media-path", default=None, help="folder that file:// image URLs may read")
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: --model)")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    p.add_argument("--request-timeout", type=float, default=None, help="seconds; longer requests are aborted")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--disable-access-log", action="store_true")
    add_metrics_cli_args(p)
    p.set_defaults(func=_run_serve)


def serve_model(args: argparse.Namespace) -> str | None:
    """`serve MODEL` or `serve --model MODEL` (both: they must agree)."""
    if args.model_tag and args.model and args.model_tag != args.model:
        raise InputError(f"the MODEL argument {args.model_tag!r} and --model {args.model!r} disagree: give one")
    return args.model_tag or args.model


def _run_serve(args: argparse.Namespace) -> int:
    args.model = serve_model(args)
    from engine.entrypoints.api_server import run_server  # lazy: only `serve` pays for FastAPI and uvicorn
    return run_server(args, engine_kwargs(args))


def _subcommand_parser(parser: argparse.ArgumentParser, names: list[str]) -> argparse.ArgumentParser:
    for name in names:
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = subparsers.choices[name]
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """argv parsed; with `--config args.yaml`, parsed again with the file's arguments put before the command
    line's (argparse keeps the last value given, so the command line wins)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    path = getattr(args, CONFIG_FILE_DEST, None)
    if not path:
        return args
    names = [args.command] + ([args.bench_command] if args.command == "bench" else [])
    skip = {"model"} if getattr(args, "model_tag", None) else set()  # the MODEL argument overrides the file's
    tokens = config_file_tokens(_subcommand_parser(parser, names), path, skip)
    return parser.parse_args(names + tokens + argv[len(names):])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cogvlm2", description="CogVLM2 inference engine on MindSpore")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_generate_parser(subparsers)
    _add_serve_parser(subparsers)
    from engine.bench import add_bench_parser
    add_bench_parser(subparsers)
    from cogvlm2.convert import add_convert_parser, add_make_random_parser
    add_convert_parser(subparsers)
    add_make_random_parser(subparsers)
    from cogvlm2.quantize import add_quantize_parser
    add_quantize_parser(subparsers)
    from kernels.tune import add_tune_parser
    add_tune_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("--") and argv[0] not in ("--help", "-h"):
        argv = ["generate"] + argv  # MindFormers style: `cogvlm2 --config ... --run_mode predict ...`
    try:
        args = parse_args(argv)
        return int(args.func(args) or 0)
    except (CogVLM2Error, ValueError, FileNotFoundError) as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
