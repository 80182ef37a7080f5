"""Shared fixtures: the golden cases, and the demo model loaded once per test session."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "cogvlm2-tiny"


def margin_limit(margins: list[float], threshold: float = 1e-3) -> int:
    """Greedy tokens are compared up to the first step whose golden top-2 margin is a near-tie."""
    return next((i for i, m in enumerate(margins) if m < threshold), len(margins))


@pytest.fixture(scope="session")
def goldens() -> dict:
    with open(TINY / "goldens.json", encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="session")
def golden_arrays():
    return np.load(TINY / "goldens.npz")


@pytest.fixture(scope="session")
def golden_cases(goldens) -> list[dict]:
    return goldens["cases"]


@pytest.fixture(scope="session")
def demo_pipeline():
    from cogvlm2.generate import SimplePipeline
    return SimplePipeline("demo")


def case_image(case: dict) -> Path | None:
    return TINY / case["image"] if case["image"] else None


def golden_prompt(case: dict) -> dict:
    """A fixture case as an engine prompt dict."""
    prompt = {"prompt": case["query"], "history": case["history"], "template": case["template"]}
    if case["image"]:
        prompt["image"] = str(case_image(case))
    return prompt


def greedy_params(case: dict):
    from engine import SamplingParams
    return SamplingParams(temperature=0, max_tokens=len(case["greedy_tokens"]), ignore_eos=True)


def assert_golden(case: dict, token_ids: list[int]) -> None:
    limit = margin_limit(case["greedy_top2_margin"])
    assert token_ids[:limit] == case["greedy_tokens"][:limit], case["name"]


def assert_no_leak(llm_or_engine) -> None:
    stats = llm_or_engine.stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"], stats


def _prefill_logits(engine, case: dict) -> np.ndarray:
    """The last prompt position's logits through the engine's own executor (its dtype, quantization and KV)."""
    from engine import SamplingParams
    engine.add_request(case["name"], golden_prompt(case), SamplingParams(max_tokens=1))
    scheduled = engine.scheduler.schedule()
    assert [c.seq.request_id for c in scheduled.chunks] == [case["name"]] and scheduled.chunks[0].needs_sample
    logits = engine.executor.run_step(engine.images.request(scheduled.chunks, engine.args.block_size))[0]
    engine.abort_request(case["name"])
    engine.step()
    return logits


def assert_close_to_goldens(engine, golden_cases: list[dict], golden_arrays, max_abs: float, min_cosine: float,
                            margin: float) -> None:
    """A reduced-precision engine against the float32 goldens: every case's last-position logits within max_abs
    (max abs) with cosine >= min_cosine, and greedy tokens equal up to the first reference top-2 margin below
    `margin`."""
    from engine import SamplingParams
    from engine.outputs import accumulate
    for case in golden_cases:
        reference = golden_arrays[f"{case['name']}.last_logits"].astype(np.float32).reshape(-1)
        logits = _prefill_logits(engine, case)
        cosine = float(logits @ reference / np.linalg.norm(logits) / np.linalg.norm(reference))
        error = float(np.abs(logits - reference).max())
        assert error <= max_abs and cosine >= min_cosine, (case["name"], error, cosine)
    for case in golden_cases:
        engine.add_request("g-" + case["name"], golden_prompt(case),
                           SamplingParams(temperature=0, max_tokens=len(case["greedy_tokens"]), ignore_eos=True))
    outputs = {}
    while engine.has_unfinished_requests():
        for delta in engine.step():
            accumulate(outputs, delta)
    for case in golden_cases:
        limit = margin_limit(case["greedy_top2_margin"], margin)
        assert outputs["g-" + case["name"]].outputs[0].token_ids[:limit] == case["greedy_tokens"][:limit], case["name"]


def demo_answers(llm, goldens: dict) -> list[bool]:
    """Whether each of the demo model's golden answers comes out exact (greedy, 24 tokens)."""
    from engine import SamplingParams
    examples = goldens["demo"]["examples"]
    prompts = [{"prompt": ex["prompt"], "template": ex["template"],
                **({"image": str(TINY / ex["image"])} if ex["image"] else {})} for ex in examples]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    return [out.outputs[0].text == ex["text"] for ex, out in zip(examples, outs)]
