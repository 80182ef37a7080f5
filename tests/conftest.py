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
