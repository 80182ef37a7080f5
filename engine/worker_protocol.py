"""Messages between the tensor-parallel driver (engine/distributed.py) and its workers (engine/worker.py),
pickled over the control connection. Importing this module is cheap, so a worker can connect to the driver
before its slow imports."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

    from engine.batch import StepRequest
    from engine.model_runner import RunnerConfig, RunnerInfo

ENV_ADDRESS = "COGVLM2_TP_ADDRESS"  # host:port of the driver's listener, in the workers' environment
ENV_AUTHKEY = "COGVLM2_TP_AUTHKEY"  # hex key of the connection's challenge
HEARTBEAT_SECONDS = 1.0


@dataclass
class Hello:        # worker -> driver, first message (before mindspore.communication.init)
    pid: int


@dataclass
class Joined:       # worker -> driver, after init(): its rank
    rank: int


@dataclass
class Setup:        # driver -> worker: each rank builds its ModelRunner from this, with its own rank filled in
    config: RunnerConfig


@dataclass
class Ready:        # worker -> driver, shard loaded, graphs compiled, KV cache allocated
    rank: int
    load_seconds: float
    info: RunnerInfo


@dataclass
class Step:         # driver -> workers, identical for all ranks
    index: int
    request: StepRequest


@dataclass
class StepDone:     # worker -> driver
    index: int
    logits: np.ndarray  # [rows to sample, this rank's vocabulary slice]


@dataclass
class Heartbeat:    # worker -> driver, every HEARTBEAT_SECONDS while busy
    pass


@dataclass
class Failed:       # worker -> driver, an exception in the worker
    message: str


@dataclass
class Shutdown:     # driver -> worker
    pass
