"""Cumulative wall-clock time per phase of the engine step, for the roofline report's breakdown."""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator


class PhaseTimer:
    """`with timer.phase("schedule"): ...` adds the elapsed time to that phase. Two perf_counter calls each."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start
            self.counts[name] += 1

    def reset(self) -> None:
        self.seconds.clear()
        self.counts.clear()

    def snapshot(self) -> dict[str, float]:
        return dict(self.seconds)
