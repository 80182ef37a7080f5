"""One tensor-parallel rank. engine/distributed.py launches N of these with
`msrun --worker_num=N --local_worker_num=N ... python -m engine.worker`.

A worker connects to the driver first (before the slow imports and mindspore.communication.init, so the driver
learns its pid early and sees it die), joins the collective group, loads its shard and KV cache, then runs every
step the driver sends until told to shut down. While busy it sends heartbeats; if the driver goes away it exits.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from multiprocessing.connection import Client, Connection
from typing import Any, Iterator

from engine.worker_protocol import (ENV_ADDRESS, ENV_AUTHKEY, HEARTBEAT_SECONDS, Failed, Heartbeat, Hello, Joined,
                                    Ready, Setup, Shutdown, Step, StepDone)



class Channel:
    """The worker's end of the control connection: pickled messages, one sender at a time, heartbeats while
    busy (loading or computing)."""

    def __init__(self, conn: Connection, heartbeat_seconds: float):
        self.conn = conn
        self.heartbeat_seconds = heartbeat_seconds
        self._send_lock = threading.Lock()
        self._busy = threading.Event()
        threading.Thread(target=self._beat, name="heartbeat", daemon=True).start()

    def send(self, message: Any) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        with self._send_lock:
            self.conn.send_bytes(data)

    def recv(self) -> Any:
        return pickle.loads(self.conn.recv_bytes())

    @contextmanager
    def busy(self) -> Iterator[None]:
        self._busy.set()
        try:
            yield
        finally:
            self._busy.clear()

    def _beat(self) -> None:
        while True:
            time.sleep(self.heartbeat_seconds)
            if not self._busy.is_set():
                continue
            try:
                self.send(Heartbeat())
            except OSError:
                os._exit(1)  # the driver is gone: nobody will ever read this rank's results


def _connect() -> Connection:
    host, port = os.environ[ENV_ADDRESS].rsplit(":", 1)
    return Client((host, int(port)), authkey=bytes.fromhex(os.environ[ENV_AUTHKEY]))


def _serve_as_msrun_scheduler() -> int:
    """msrun also runs this script as its scheduler (meta server) process: init() serves the cluster and does
    not return while it runs."""
    from mindspore.communication import init
    from cogvlm2.runtime import configure_mindspore
    configure_mindspore()
    init()
    return 0


def main() -> int:
    if os.environ.get("MS_ROLE") == "MS_SCHED":
        return _serve_as_msrun_scheduler()
    channel = Channel(_connect(), HEARTBEAT_SECONDS)
    channel.send(Hello(os.getpid()))
    try:
        _serve(channel)
    except EOFError:
        return 0  # the driver went away: exit normally, msrun then finishes on its own
    except BaseException as e:  # noqa: BLE001 - reported to the driver, which shuts the group down
        traceback.print_exc()  # the whole traceback goes to this worker's log
        try:
            channel.send(Failed(f"{type(e).__name__}: {e}"))
        except OSError:
            pass
        return 1
    # Shut down by the driver, which ends msrun and its scheduler next: skip MindSpore's cluster finalisation
    # (about 5 s per process here) since there is nothing to save.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _serve(channel: Channel) -> None:
    """Returns when the driver says shut down."""
    with channel.busy():
        from mindspore.communication import get_rank, init
        from cogvlm2.runtime import configure_mindspore
        configure_mindspore()
        init()
        rank = get_rank()
        channel.send(Joined(rank))
    setup = channel.recv()
    assert isinstance(setup, Setup), setup
    with channel.busy():
        from engine.model_runner import ModelRunner
        start = time.perf_counter()
        runner = ModelRunner(dataclasses.replace(setup.config, rank=rank))
        channel.send(Ready(rank, time.perf_counter() - start, runner.info))
    while True:
        message = channel.recv()
        if isinstance(message, Shutdown):
            return
        assert isinstance(message, Step), message
        with channel.busy():
            channel.send(StepDone(message.index, runner.run_step(message.request)))


if __name__ == "__main__":
    sys.exit(main())
