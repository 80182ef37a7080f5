"""Executors run a step's StepRequest on the model side: in this process, or on msrun tensor-parallel workers
(engine/distributed.py). Both end in the same `ModelRunner.run_step`."""
from __future__ import annotations

from typing import Protocol

import numpy as np

from engine.batch import StepRequest
from engine.model_runner import ModelRunner, RunnerConfig, RunnerInfo
from engine.timing import PhaseTimer


class Executor(Protocol):
    info: RunnerInfo
    num_images_encoded: int

    def run_step(self, step: StepRequest) -> np.ndarray:
        """Logits [the rows StepInputs.logits_positions asks for, vocab] in batch order."""

    def shutdown(self) -> None:
        """Release the model side. Idempotent."""


class InProcessExecutor:
    def __init__(self, config: RunnerConfig, timer: PhaseTimer):
        self.runner = ModelRunner(config, timer)
        self.info = self.runner.info
        self.num_images_encoded = 0

    def run_step(self, step: StepRequest) -> np.ndarray:
        self.num_images_encoded += len(step.new_images)
        return self.runner.run_step(step)

    def shutdown(self) -> None:
        """Nothing to release: the model lives in this process."""


def make_executor(config: RunnerConfig, timer: PhaseTimer) -> Executor:
    if config.tensor_parallel_size == 1:
        return InProcessExecutor(config, timer)
    from engine.distributed import TensorParallelExecutor  # starts msrun: only when asked for
    return TensorParallelExecutor(config, timer)
