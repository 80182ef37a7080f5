"""The `cogvlm2` command line: the fixture through --prompts-file, the demo examples, errors, the console script."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY, case_image, margin_limit
from engine.cli import main

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
