"""Tensor parallelism: the driver side. `TensorParallelExecutor` is the executor when tensor_parallel_size > 1.

The user-facing process (the driver) keeps the processor, scheduler, block manager, image plan and sampler. It
starts `msrun --worker_num=N --local_worker_num=N ... python -m engine.worker`: N worker processes, one per device,
each building a ModelRunner over one shard of the model (cogvlm2/parallel.py) and the KV cache of its heads. Each
worker connects back to the driver over a local authenticated socket (multiprocessing.connection). Every step the
driver sends all workers the same pickled StepRequest (engine/batch.py: the flat batch, the pixel values of images
to encode, the images to evict); every worker runs `ModelRunner.run_step` (MindSpore collectives between them)
and returns the logits of its vocabulary slice; the driver concatenates them and samples once.

Failure handling: a worker that dies closes its socket (seen at once); a worker that stops sending heartbeats
while busy, or a step longer than the step timeout, counts as hung; msrun exiting early counts as dead. Any of
these kills the whole worker group (by pid) and raises WorkerFailure, which LLMEngine turns into failed requests.
"""
from __future__ import annotations

import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge, wait
from pathlib import Path
from typing import Any

import numpy as np

from cogvlm2.parallel import check_tensor_parallel
from engine.batch import StepRequest
from engine.model_runner import RunnerConfig, RunnerInfo
from engine.timing import PhaseTimer
from engine.worker_protocol import (ENV_ADDRESS, ENV_AUTHKEY, Failed, Hello, Joined, Ready, Setup, Shutdown, Step,
                                    StepDone)
from kernels.device import launch_env

REPO_ROOT = Path(__file__).resolve().parent.parent
POLL_SECONDS = 0.2


class WorkerFailure(RuntimeError):
    """A tensor-parallel worker died, hung or failed; the worker group has been shut down."""


class MsrunNotFoundError(FileNotFoundError):
    """tensor_parallel_size > 1 needs MindSpore's msrun launcher."""


@dataclass(frozen=True)
class Timeouts:
    start: float = 300.0      # msrun start-up until every worker has joined the collective group
    heartbeat: float = 60.0   # silence from a busy worker (loading or computing) before it counts as hung
    step: float = 3600.0      # one forward step
    shutdown: float = 15.0    # clean exit after the shutdown message, before the group is killed


# ---- launching ------------------------------------------------------------------------------------------------
def find_msrun(python: str | None = None) -> str:
    """msrun beside this Python (the venv's bin), else on PATH."""
    python = python or sys.executable
    beside = Path(python).parent / "msrun"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("msrun")
    if found:
        return found
    raise MsrunNotFoundError(
        f"tensor_parallel_size > 1 starts its workers with MindSpore's `msrun` launcher, found neither beside "
        f"{python} nor on PATH; install MindSpore in this environment (pip install mindspore) or use "
        f"tensor_parallel_size=1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_env(address: str, authkey: bytes, size: int, device: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(launch_env(device, size, env))  # each worker takes its local rank's device; HCCL's settings on Ascend
    # msrun starts `python` from PATH: make it this interpreter, able to import this checkout
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env[ENV_ADDRESS] = address
    env[ENV_AUTHKEY] = authkey.hex()
    env.setdefault("COGVLM2_THREADS", str(max(1, (os.cpu_count() or 1) // size)))  # ranks share this host's cores
    return env


def msrun_command(msrun: str, size: int, master_port: int, log_dir: Path) -> list[str]:
    # --tail_worker_log names no existing rank: worker logs stay in log_dir instead of being copied to stdout
    return [msrun, f"--worker_num={size}", f"--local_worker_num={size}", f"--master_port={master_port}",
            "--join=True", f"--log_dir={log_dir}", f"--tail_worker_log={size}", "python", "-m", "engine.worker"]


@dataclass
class WorkerGroup:
    """The processes of one msrun launch. msrun puts each worker in its own session, so workers are killed by
    pid, msrun with its scheduler by msrun's process group."""
    msrun: subprocess.Popen
    log_dir: Path
    pids: list[int] = field(default_factory=list)

    def alive(self) -> bool:
        return self.msrun.poll() is None

    def kill(self, workers: bool = True, timeout: float = 5.0) -> None:
        """SIGKILL, then wait (up to `timeout`) until the processes are really gone, so their memory is free."""
        if workers:
            for pid in self.pids:
                _signal_group(pid, signal.SIGKILL)
        if self.msrun.poll() is None:
            _signal_group(self.msrun.pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        try:
            self.msrun.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        while any(is_running(pid) for pid in self.pids) and time.monotonic() < deadline:
            time.sleep(0.02)

    def log_tail(self, rank: int | None, lines: int = 8) -> str:
        name = "msrun.log" if rank is None else f"worker_{rank}.log"
        try:
            text = (self.log_dir / name).read_text(errors="replace").splitlines()
        except OSError:
            return ""
        useful = [line for line in text if not line.startswith(("[WARNING]", "[INFO]"))]
        return "\n".join(useful[-lines:])


def is_running(pid: int) -> bool:
    """Alive and not a zombie (a killed worker is reaped by init once msrun is gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: fall back to "the pid exists"
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _close(group: WorkerGroup, conns: list[Connection], grace: float) -> None:
    """Ask every worker to exit and wait up to `grace` seconds for their connections to close; then end msrun
    and its scheduler (they hold nothing once the workers are gone) and kill any worker still running."""
    for conn in conns:
        try:
            conn.send_bytes(pickle.dumps(Shutdown()))
        except OSError:
            pass
    deadline = time.monotonic() + grace
    open_conns = [conn for conn in conns if not conn.closed]
    while open_conns and time.monotonic() < deadline:
        for conn in wait(open_conns, timeout=POLL_SECONDS):
            try:
                conn.recv_bytes()  # a late heartbeat or reply
            except (EOFError, OSError):
                open_conns.remove(conn)
    clean = not open_conns
    group.kill(workers=not clean)
    for conn in conns:
        conn.close()
    if clean:
        shutil.rmtree(group.log_dir, ignore_errors=True)


# ---- the executor ---------------------------------------------------------------------------------------------
@dataclass
class _Worker:
    conn: Connection
    pid: int
    rank: int | None = None  # known once it has joined the collective group

    @property
    def name(self) -> str:
        return f"tensor-parallel worker rank {self.rank}" if self.rank is not None else \
            f"tensor-parallel worker pid {self.pid}"


class TensorParallelExecutor:
    """The executor (run_step, shutdown, info, num_images_encoded) over N msrun-launched workers."""

    def __init__(self, config: RunnerConfig, timer: PhaseTimer | None = None, timeouts: Timeouts = Timeouts()):
        size = config.tensor_parallel_size
        check_tensor_parallel(config.source.config, size)
        self.size, self.timeouts = size, timeouts
        self.timer = timer or PhaseTimer()
        self.num_images_encoded = 0
        self.load_seconds: list[float] = []
        self.infos: list[RunnerInfo] = []  # per rank, as the workers built their runners
        self._step = 0
        self._failure: str | None = None
        self._workers: list[_Worker] = []  # by rank once started
        self._conns: list[Connection] = []  # every accepted connection, closed by the finalizer or _abort
        msrun = find_msrun()
        authkey = os.urandom(32)
        listener = socket.create_server(("127.0.0.1", 0))
        listener.settimeout(POLL_SECONDS)
        log_dir = Path(tempfile.mkdtemp(prefix="cogvlm2-tp-"))
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        with open(log_dir / "msrun.log", "wb") as log:
            process = subprocess.Popen(msrun_command(msrun, size, _free_port(), log_dir), stdout=log,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=_worker_env(address, authkey, size, config.device), cwd=REPO_ROOT,
                                       start_new_session=True)
        self.group = WorkerGroup(process, log_dir)
        # shuts the workers down when this executor is garbage collected or the interpreter exits
        self._finalizer = weakref.finalize(self, _close, self.group, self._conns, timeouts.shutdown)
        try:
            self._start(listener, authkey, Setup(config))
        except BaseException as e:
            self._abort(str(e))
            if isinstance(e, WorkerFailure):
                raise WorkerFailure(f"tensor-parallel start-up failed: {e}") from None
            raise
        finally:
            listener.close()

    @property
    def log_dir(self) -> Path:
        return self.group.log_dir

    # ---- start-up
    def _start(self, listener: socket.socket, authkey: bytes, setup: Setup) -> None:
        deadline = time.monotonic() + self.timeouts.start
        workers = self._accept(listener, authkey, deadline)
        # importing MindSpore and init() hold the GIL for seconds: no heartbeat check before the workers join
        for worker, joined in zip(workers, self._gather(workers, Joined, deadline, heartbeats=False)):
            worker.rank = joined.rank
        if sorted(w.rank for w in workers) != list(range(self.size)):
            raise WorkerFailure(f"workers joined as ranks {sorted(w.rank for w in workers)}, "
                                f"expected 0..{self.size - 1}")
        self._workers = sorted(workers, key=lambda w: w.rank)
        self._broadcast(setup)
        ready = self._gather(self._workers, Ready, None)
        self.load_seconds = [r.load_seconds for r in ready]
        self.infos = [r.info for r in ready]

    @property
    def info(self) -> RunnerInfo:
        return self.infos[0]

    @property
    def kv_cache_shapes(self) -> list[tuple[int, ...]]:
        return [info.kv_cache_shape for info in self.infos]

    def _accept(self, listener: socket.socket, authkey: bytes, deadline: float) -> list[_Worker]:
        workers: list[_Worker] = []
        while len(workers) < self.size:
            self._check(deadline, "waiting for the workers to connect")
            try:
                sock, _ = listener.accept()
            except socket.timeout:
                continue
            sock.setblocking(True)
            conn = Connection(sock.detach())
            self._conns.append(conn)
            deliver_challenge(conn, authkey)
            answer_challenge(conn, authkey)
            hello = pickle.loads(conn.recv_bytes())
            if not isinstance(hello, Hello):
                raise WorkerFailure(f"unexpected first message from a worker: {hello!r}")
            workers.append(_Worker(conn, hello.pid))
            self.group.pids.append(hello.pid)
        return workers

    # ---- the step
    def run_step(self, request: StepRequest) -> np.ndarray:
        """Logits [the rows StepInputs.logits_positions asks for, vocab]: the ranks' vocabulary slices joined."""
        if self._failure is not None:
            raise WorkerFailure(self._failure)
        step = Step(self._step, request)
        self._step += 1
        with self.timer.phase("decoder"):
            try:
                self._broadcast(step)
                done = self._gather(self._workers, StepDone, time.monotonic() + self.timeouts.step)
            except WorkerFailure as e:
                self._abort(str(e))
                raise
        self.num_images_encoded += len(request.new_images)
        return np.concatenate([reply.logits for reply in done], axis=1)

    def shutdown(self) -> None:
        """Stop the workers: a clean exit, else killed after the shutdown timeout. Idempotent."""
        if self._finalizer.alive:
            self._finalizer()
        if self._failure is None:
            self._failure = "the tensor-parallel workers have been shut down"

    def _abort(self, reason: str) -> None:
        """Kill the group at once (a failed group cannot be trusted to exit cleanly)."""
        self._failure = reason
        self._finalizer.detach()
        self.group.kill()
        for conn in self._conns:
            conn.close()

    # ---- control channel
    def _broadcast(self, message: Any) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)  # pickled once for all ranks
        for worker in self._workers:
            try:
                worker.conn.send_bytes(data)
            except OSError as e:
                raise WorkerFailure(self._died(worker, f"its connection failed ({e})")) from None

    def _gather(self, workers: list[_Worker], expected: type, deadline: float | None,
                heartbeats: bool = True) -> list[Any]:
        """One `expected` message from every worker, in the order of `workers`. Heartbeats prove a busy worker
        alive; a closed connection, a failure message, silence longer than the heartbeat timeout, msrun exiting
        or the deadline raise WorkerFailure."""
        replies: dict[int, Any] = {}
        last_heard = [time.monotonic()] * len(workers)
        index = {id(w.conn): i for i, w in enumerate(workers)}
        while len(replies) < len(workers):
            for conn in wait([w.conn for w in workers], timeout=POLL_SECONDS):
                i = index[id(conn)]
                message = self._recv(workers[i])
                last_heard[i] = time.monotonic()
                if isinstance(message, expected):
                    replies[i] = message
            self._check(deadline, f"waiting for {expected.__name__}")
            for i, worker in enumerate(workers):
                if heartbeats and i not in replies and time.monotonic() - last_heard[i] > self.timeouts.heartbeat:
                    raise WorkerFailure(f"{worker.name} sent no heartbeat for {self.timeouts.heartbeat:g} s "
                                        f"(hung); logs in {self.log_dir}")
        return [replies[i] for i in range(len(workers))]

    def _recv(self, worker: _Worker) -> Any:
        try:
            message = pickle.loads(worker.conn.recv_bytes())
        except (EOFError, OSError):
            raise WorkerFailure(self._died(worker, "its connection closed")) from None
        if isinstance(message, Failed):
            raise WorkerFailure(f"{worker.name} failed: {message.message}; logs in {self.log_dir}")
        return message

    def _check(self, deadline: float | None, doing: str) -> None:
        if not self.group.alive():
            tail = self.group.log_tail(None)
            raise WorkerFailure(f"msrun exited with code {self.group.msrun.returncode} while {doing}; logs in "
                                f"{self.log_dir}" + (f"\n{tail}" if tail else ""))
        if deadline is not None and time.monotonic() > deadline:
            raise WorkerFailure(f"timed out {doing}; logs in {self.log_dir}")

    def _died(self, worker: _Worker, how: str) -> str:
        tail = self.group.log_tail(worker.rank) if worker.rank is not None else ""
        return f"{worker.name} died ({how}); logs in {self.log_dir}" + (f"\n{tail}" if tail else "")
