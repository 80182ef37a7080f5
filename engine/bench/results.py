"""What every benchmark shares: the statistics of a list of timings, and results written as JSON."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np


@dataclass
class Distribution:
    """mean, median, standard deviation and the asked percentiles of some timings (in the units asked for)."""
    mean: float
    median: float
    std: float
    percentiles: dict[float, float]


def distribution(values: Sequence[float], percentiles: Sequence[float] = (99,), scale: float = 1.0) -> Distribution:
    """NumPy's statistics of `values` times `scale` (1000: seconds -> ms). No values: all 0, as vLLM reports."""
    arr = np.asarray(values if len(values) else [0.0], dtype=np.float64) * scale
    return Distribution(float(arr.mean()), float(np.median(arr)), float(arr.std()),
                        {p: float(np.percentile(arr, p)) for p in percentiles})


def percentile_label(p: float) -> str:
    """99 -> "99", 99.9 -> "99.9" (vLLM's p99_ttft_ms, p99.9_ttft_ms keys)."""
    return str(int(p)) if float(p).is_integer() else str(p)


def parse_percentiles(text: str) -> tuple[float, ...]:
    """--metric-percentiles "25,50,99"."""
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError as e:
        raise ValueError(f"--metric-percentiles: expected comma-separated numbers, got {text!r}") from e
    if not values or not all(0 <= p <= 100 for p in values):
        raise ValueError(f"--metric-percentiles: expected numbers in [0, 100], got {text!r}")
    return values


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    """`path` "-" prints the JSON instead."""
    text = json.dumps(payload, indent=2)
    if str(path) == "-":
        print(text)
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text + "\n")
    print(f"results written to {path}", file=sys.stderr)
