"""The `cogvlm2` command line: the fixture through --prompts-file, the demo examples, errors, the console script,
and vLLM's conventions (serve MODEL, --seed, --host, --config args.yaml, --model-config for a .ckpt)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import TINY, case_image, margin_limit
from engine.cli import _apply_mindformers_flags, _subcommand_parser, build_parser, main, parse_args, serve_model
from engine.config import engine_kwargs

REPO = Path(__file__).resolve().parents[1]


def _run(capsys, argv: list[str]) -> tuple[int, list[str], str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, [line for line in captured.out.splitlines() if line.strip()], captured.err


def _write_jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    return path


def test_fixture_cases_through_prompts_file(tmp_path, capsys, golden_cases):
    items = [{"prompt": c["query"], "history": c["history"], "template": c["template"],
              "image": str(case_image(c)) if c["image"] else None, "max_tokens": len(c["greedy_tokens"]),
              "ignore_eos": True} for c in golden_cases]
    code, lines, _ = _run(capsys, ["generate", "--prompts-file", str(_write_jsonl(tmp_path / "p.jsonl", items))])
    assert code == 0
    assert len(lines) == len(golden_cases)
    for case, line in zip(golden_cases, lines):
        result = json.loads(line)
        assert set(result) == {"prompt_token_ids", "token_ids", "text", "finish_reason"}
        assert result["prompt_token_ids"] == case["input_ids"]
        limit = margin_limit(case["greedy_top2_margin"])
        assert result["token_ids"][:limit] == case["greedy_tokens"][:limit], case["name"]
        assert result["finish_reason"] == "length"


def test_demo_examples_through_cli(tmp_path, capsys, goldens):
    examples = goldens["demo"]["examples"]
    items = [{"prompt": ex["prompt"], "template": ex["template"],
              "image": str(TINY / ex["image"]) if ex["image"] else None, "max_tokens": 24} for ex in examples]
    code, lines, _ = _run(capsys, ["generate", "--model", "demo", "--prompts-file",
                                   str(_write_jsonl(tmp_path / "demo.jsonl", items))])
    assert code == 0
    for ex, line in zip(examples, lines):
        result = json.loads(line)
        assert (result["token_ids"], result["text"], result["finish_reason"]) == \
               (ex["token_ids"], ex["text"], ex["finish_reason"])


def test_single_prompt_json_engine_and_simple_path_agree(capsys, goldens):
    ex = next(e for e in goldens["demo"]["examples"] if e["image"] and len(e["token_ids"]) > 5)
    argv = ["generate", "--prompt", ex["prompt"], "--image", str(TINY / ex["image"]), "--json"]
    code, engine_lines, _ = _run(capsys, argv)
    assert code == 0
    code, simple_lines, _ = _run(capsys, argv + ["--simple"])
    assert code == 0
    engine_out, simple_out = json.loads(engine_lines[0]), json.loads(simple_lines[0])
    assert engine_out == simple_out
    assert engine_out["token_ids"] == ex["token_ids"] and engine_out["text"] == ex["text"]


def test_history_and_template_flags(capsys, golden_cases):
    case = next(c for c in golden_cases if c["history"] and c["template"] == "vqa")
    code, lines, _ = _run(capsys, ["generate", "--prompt", case["query"], "--history", json.dumps(case["history"]),
                                   "--template", "vqa", "--max-tokens", "4", "--ignore-eos", "--json"])
    assert code == 0
    result = json.loads(lines[0])
    assert result["prompt_token_ids"] == case["input_ids"]
    assert result["token_ids"] == case["greedy_tokens"][:4]


def test_bad_image_fails_the_request_with_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    code, lines, _ = _run(capsys, ["generate", "--prompt", "hi", "--image", str(bad), "--json"])
    assert code == 1
    result = json.loads(lines[0])
    assert result["finish_reason"] == "error" and "ImageError" in result["error"]


def test_bad_history_json_is_rejected(capsys):
    code, _, err = _run(capsys, ["generate", "--prompt", "hi", "--history", "[not json"])
    assert code == 2 and "--history" in err


def test_unknown_model_is_rejected(capsys):
    code, _, err = _run(capsys, ["generate", "--model", "no-such-preset", "--prompt", "hi"])
    assert code == 2 and "no-such-preset" in err


def test_console_script_main_job():
    """The README's main job: the embedded demo model answers about an example image kept in the repo."""
    exe = Path(sys.executable).parent / "cogvlm2"
    assert exe.exists(), "the package is not installed (pip install -e .)"
    result = subprocess.run([str(exe), "generate", "--image", str(REPO / "cogvlm2/demo_model/demo_0.png"),
                             "--prompt", "What shapes are in the image?"], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "a black circle and a purple triangle"


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_converted_ckpt_gives_identical_greedy_tokens(tmp_path, capsys, golden_cases, dtype):
    """cogvlm2 convert (MindFormers' flags) -> .ckpt -> MindFormers-style predict flags: the golden tokens."""
    from cogvlm2.model_source import DEMO_MODEL_DIR
    ckpt = tmp_path / f"cogvlm2_{dtype}.ckpt"
    code, _, err = _run(capsys, ["convert", "--modal", "image", "--model", "cogvlm2", "--input_path",
                                 str(DEMO_MODEL_DIR), "--output_path", str(ckpt), "--dtype", dtype])
    assert code == 0, err
    case = next(c for c in golden_cases if c["image"] and not c["history"] and c["template"] == "chat")
    n = len(case["greedy_tokens"])
    code, lines, err = _run(capsys, [
        "--config", str(REPO / "configs/cogvlm2/tiny.yaml"), "--run_mode", "predict",
        "--predict_data", str(case_image(case)), case["query"], "--modal_type", "image", "text",
        "--load_checkpoint", str(ckpt), "--max-tokens", str(n), "--ignore-eos", "--json"])
    assert code == 0, err
    result = json.loads(lines[0])
    assert result["prompt_token_ids"] == case["input_ids"]
    limit = margin_limit(case["greedy_top2_margin"])
    assert result["token_ids"][:limit] == case["greedy_tokens"][:limit]


# ---- vLLM's conventions: serve MODEL, --seed, --host, --config args.yaml, --model-config ------------------------
def _write_yaml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_serve_takes_the_model_as_positional_or_flag():
    assert serve_model(parse_args(["serve", "tiny"])) == "tiny"
    assert serve_model(parse_args(["serve", "--model", "tiny"])) == "tiny"
    assert serve_model(parse_args(["serve", "--port", "9000", "tiny"])) == "tiny"
    assert serve_model(parse_args(["serve", "tiny", "--model", "tiny"])) == "tiny"
    assert serve_model(parse_args(["serve"])) is None  # the engine's default, demo


def test_serve_model_positional_and_flag_that_disagree_are_an_error(capsys):
    code, _, err = _run(capsys, ["serve", "tiny", "--model", "demo"])
    assert code == 2 and "'tiny'" in err and "'demo'" in err and "disagree" in err


def test_vllm_flag_names():
    args = parse_args(["serve", "--seed", "7", "--max-model-len", "1024", "--dtype", "float32",
                       "--no-enable-prefix-caching"])
    assert (args.seed, args.max_model_len, args.dtype, args.enable_prefix_caching) == (7, 1024, "float32", False)
    assert parse_args(["serve", "--engine-seed", "3"]).seed == 3  # the old spelling still works
    assert parse_args(["serve", "--enable-prefix-caching"]).enable_prefix_caching is True


def test_generate_seed_is_the_engines_and_request_seed_the_requests():
    args = parse_args(["generate", "--prompt", "hi", "--seed", "5", "--request-seed", "6"])
    assert (args.seed, args.request_seed) == (5, 6)
    assert engine_kwargs(args)["seed"] == 5


def test_serve_host_defaults_to_all_interfaces_as_vllm_and_says_so():
    parser = _subcommand_parser(build_parser(), ["serve"])
    host = parser._option_string_actions["--host"]
    assert host.default is None and "all interfaces" in host.help


def test_config_file_gives_defaults_that_the_command_line_overrides(tmp_path):
    config = _write_yaml(tmp_path / "args.yaml", """
max_model_len: 1024          # underscores
max-num-seqs: 8              # dashes
enable_prefix_caching: false
port: 9001
allowed-origins: ["http://a.example"]
limit_mm_per_prompt: {image: 0}
model: tiny
""")
    args = parse_args(["serve", "--config", str(config), "--port", "9002"])
    assert (args.max_model_len, args.max_num_seqs, args.enable_prefix_caching, args.port) == (1024, 8, False, 9002)
    assert args.allowed_origins == ["http://a.example"] and args.limit_mm_per_prompt == {"image": 0}
    assert serve_model(args) == "tiny"
    assert parse_args(["serve", "--config", str(config), "--enable-prefix-caching"]).enable_prefix_caching
    args = parse_args(["serve", "demo", "--config", str(config)])  # MODEL on the command line wins too
    assert serve_model(args) == "demo" and args.max_model_len == 1024


def test_config_file_for_bench(tmp_path):
    config = _write_yaml(tmp_path / "bench.yaml", "request_rate: 8\nnum-prompts: 12\nignore_eos: true\n")
    args = parse_args(["bench", "serve", "--config", str(config), "--num-prompts", "3"])
    assert (args.request_rate, args.num_prompts, args.ignore_eos) == (8.0, 3, True)


@pytest.mark.parametrize("text, message", [
    ("max_modle_len: 10\n", "'max_modle_len'"),
    ("enable-prefix-caching: maybe\n", "true or false"),
    ("config: other.yaml\n", "cannot name another"),
    ("- a list\n", "mapping"),
])
def test_config_file_errors_name_the_key(tmp_path, capsys, text, message):
    config = _write_yaml(tmp_path / "bad.yaml", text)
    code, _, err = _run(capsys, ["serve", "--config", str(config)])
    assert code == 2 and message in err and str(config) in err


def test_config_file_values_are_checked_as_flags_are(tmp_path, capsys):
    config = _write_yaml(tmp_path / "bad.yaml", "dtype: float8\n")
    with pytest.raises(SystemExit) as exc:
        parse_args(["serve", "--config", str(config)])
    assert exc.value.code == 2 and "float8" in capsys.readouterr().err


def test_generate_config_and_model_config_are_one_setting(capsys):
    yaml_path = str(REPO / "configs/cogvlm2/tiny.yaml")
    args = parse_args(["generate", "--prompt", "hi", "--config", yaml_path])
    _apply_mindformers_flags(args)
    assert engine_kwargs(args)["config_yaml"] == yaml_path
    code, _, err = _run(capsys, ["generate", "--prompt", "hi", "--config", yaml_path, "--model-config", "other.yaml"])
    assert code == 2 and "disagree" in err


def test_serve_a_ckpt_with_model_config_and_an_args_file(tmp_path, capsys):
    """`cogvlm2 serve model.ckpt --config args.yaml` whose file names the MindFormers model yaml: it answers."""
    from cogvlm2.model_source import DEMO_MODEL_DIR
    from test_server import running_server
    ckpt = tmp_path / "demo.ckpt"
    code, _, err = _run(capsys, ["convert", "--modal", "image", "--model", "cogvlm2", "--input_path",
                                 str(DEMO_MODEL_DIR), "--output_path", str(ckpt), "--dtype", "bf16"])
    assert code == 0, err
    config = _write_yaml(tmp_path / "args.yaml", f"model-config: {REPO / 'configs/cogvlm2/tiny.yaml'}\n"
                                                 "max_model_len: 1024\n")
    with running_server(str(ckpt), ["--config", str(config)], tmp_path / "serve.log") as server:
        assert httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]["max_model_len"] == 1024
        reply = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hello", "max_tokens": 3,
                                                                 "ignore_eos": True}, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 3
