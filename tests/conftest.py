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
