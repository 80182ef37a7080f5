"""asyncio front end of the engine: `async for delta in AsyncLLM(...).generate(prompt, params)`.

The LLMEngine lives in one background thread (its forward pass is blocking CPU work), so the event loop never
waits on the model. Callers hand requests to that thread through a thread-safe queue; after every step the thread
passes the step's outputs back to the event loop with `call_soon_threadsafe`, where they are routed to the
waiting callers. A caller that stops iterating (breaks, closes the generator, is cancelled) aborts its request,
which frees its KV blocks.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# Called in the engine thread after every step that produced outputs: (the step's deltas, monotonic time).
# The outputs carry the engine's request ids: the caller's id plus "-N".
StepListener = Callable[[list[RequestOutput], float], None]


class EngineDeadError(RuntimeError):
    """The engine thread has stopped (shut down or crashed): no request can make progress."""


@dataclass
class _AddRequest:
    request_id: str
    prompt: str | dict
    sampling_params: SamplingParams | dict | None
    arrival_time: float


@dataclass
class _AbortRequest:
    request_id: str


_STOP = object()


@dataclass
class _Stream:
    """One caller's view of its request. Touched only on the event loop."""
    request_id: str  # the caller's id; the engine knows the request by a unique internal id
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    pending: RequestOutput | None = None  # deltas not yet taken by the caller, merged
    error: str | None = None

    def put(self, delta: RequestOutput) -> None:
        """Deltas that arrive while the caller is busy are merged, so a slow caller costs no extra outputs."""
        if self.pending is None:
            self.pending = delta.copy()
            self.pending.request_id = self.request_id
        else:
            self.pending.add(delta)
        self.ready.set()

    def take(self) -> RequestOutput:
        delta, self.pending = self.pending, None
        return delta


class AsyncLLM:
    """Streams RequestOutput deltas to many concurrent asyncio callers from one engine thread.

    Construction blocks until the model is loaded (in the engine thread). Use `async with AsyncLLM(...) as llm`
    or `await llm.shutdown()`; a shut-down or crashed engine makes every waiting caller raise EngineDeadError.
    """

    def __init__(self, model: str | None = None, **engine_args: Any):
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        # Keyed by engine id. A caller's id maps to a fresh engine id per request, so an id reused right after an
        # abort can never receive the old request's late outputs.
        self._streams: dict[str, _Stream] = {}
        self._engine_ids: dict[str, str] = {}
        self._counter = itertools.count()
        self._listeners: list[StepListener] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dead_reason: str | None = None
        self._stats: dict[str, Any] = {}
        self.engine = None
        started = threading.Event()
        startup_errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._engine_thread, name="cogvlm2-engine", daemon=True,
                                        args=(model, engine_args, started, startup_errors))
        self._thread.start()
        started.wait()
        if startup_errors:
            raise startup_errors[0]

    # ---- read-only engine facts (fixed after construction, safe from any thread) ------------------------------
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def config(self):
        return self.engine.config

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def grammars(self):
        """The engine's grammar compiler (thread-safe): servers validate a constraint before submitting it."""
        return self.engine.grammars

    @property
    def is_running(self) -> bool:
        return self._dead_reason is None and self._thread.is_alive()

    def stats(self) -> dict[str, Any]:
        """The engine's stats() as of its latest step (a snapshot: the engine thread owns the live counters)."""
        return dict(self._stats)

    def add_step_listener(self, listener: StepListener) -> None:
        """`listener(outputs, now)` runs in the engine thread after each step; keep it short. Errors are logged."""
        self._listeners.append(listener)

    # ---- the caller's API ------------------------------------------------------------------------------------
    async def generate(self, prompt: str | dict, sampling_params: SamplingParams | dict | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yields deltas: the text and token ids that are new since the previous yield; the last one has
        `finished` and `finish_reason` set ("error" with `.error` for a bad request)."""
        request_id = request_id if request_id is not None else f"req-{uuid.uuid4().hex}"
        engine_id, stream = self._open_stream(request_id)
        self._commands.put(_AddRequest(engine_id, prompt, sampling_params, time.monotonic()))
        finished = False
        try:
            while not finished:
                await stream.ready.wait()
                stream.ready.clear()
                if stream.error is not None:
                    raise EngineDeadError(stream.error)
                delta = stream.take()
                finished = delta.finished
                yield delta
        finally:
            # Runs when the caller breaks out, closes the generator or is cancelled, too.
            self._streams.pop(engine_id, None)
            self._engine_ids.pop(request_id, None)
            if not finished and self._dead_reason is None:
                self._commands.put(_AbortRequest(engine_id))

    async def abort(self, request_id: str) -> None:
        """Stop a request; its caller receives a final delta with finish_reason "abort". Unknown ids are ignored."""
        engine_id = self._engine_ids.get(request_id)
        if engine_id is not None and self._dead_reason is None:
            self._commands.put(_AbortRequest(engine_id))

    async def shutdown(self) -> None:
        """Stop the engine thread; callers still waiting get EngineDeadError."""
        if self._thread.is_alive():
            self._commands.put(_STOP)
            await asyncio.to_thread(self._thread.join)
        self._mark_dead("the engine was shut down")

    async def __aenter__(self) -> "AsyncLLM":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.shutdown()

    def _open_stream(self, request_id: str) -> tuple[str, _Stream]:
        if self._dead_reason is not None:
            raise EngineDeadError(self._dead_reason)
        if request_id in self._engine_ids:
            raise ValueError(f"request_id {request_id!r} is already in use")
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._streams:
                raise RuntimeError("AsyncLLM serves one event loop at a time; another loop has open requests")
            self._loop = loop
        engine_id = f"{request_id}-{next(self._counter)}"
        stream = _Stream(request_id)
        self._streams[engine_id] = stream
        self._engine_ids[request_id] = engine_id
        return engine_id, stream

    # ---- event-loop side of the hand-over ------------------------------------------------------------------
    def _route(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put(out)

    def _fail_all(self, reason: str) -> None:
        for stream in self._streams.values():
            stream.error = reason
            stream.ready.set()

    def _mark_dead(self, reason: str) -> None:
        """Callable from any thread. The reason is set before failing the streams, so a stream opened later
        sees it in _open_stream and none is left waiting."""
        if self._dead_reason is None:
            self._dead_reason = reason
        self._call_on_loop(self._fail_all, self._dead_reason)

    def _call_on_loop(self, fn: Callable, *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop closed in between
            pass

    # ---- the engine thread ---------------------------------------------------------------------------------
    def _engine_thread(self, model: str | None, engine_args: dict, started: threading.Event,
                       startup_errors: list[BaseException]) -> None:
        try:
            from engine.llm_engine import LLMEngine
            self.engine = LLMEngine(model, **engine_args)
            self._stats = self.engine.stats()
        except BaseException as e:  # noqa: BLE001 - re-raised in the constructor
            startup_errors.append(e)
            return
        finally:
            started.set()
        try:
            self._run_steps()
        except BaseException as e:  # noqa: BLE001 - a crash must reach every waiting caller
            logger.exception("engine thread crashed")
            self._mark_dead(f"the engine thread crashed: {type(e).__name__}: {e}")

    def _run_steps(self) -> None:
        while True:
            idle = not self.engine.has_unfinished_requests()
            for command in self._take_commands(block=idle):
                if command is _STOP:
                    return
                self._apply(command)
            if not self.engine.has_unfinished_requests():
                continue
            outputs = self.engine.step()
            self._stats = self.engine.stats()
            if outputs:
                self._notify_listeners(outputs)
                self._call_on_loop(self._route, outputs)

    def _take_commands(self, block: bool) -> list:
        commands = [self._commands.get()] if block else []
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _apply(self, command: _AddRequest | _AbortRequest) -> None:
        if isinstance(command, _AbortRequest):
            self.engine.abort_request(command.request_id)
            return
        try:
            self.engine.add_request(command.request_id, command.prompt, command.sampling_params,
                                    arrival_time=command.arrival_time)
        except Exception as e:  # noqa: BLE001 - e.g. an id still in use: fail this request, not the engine
            failed = RequestOutput.failed(command.request_id, None, command.arrival_time, f"{type(e).__name__}: {e}")
            self._call_on_loop(self._route, [failed])

    def _notify_listeners(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        for listener in self._listeners:
            try:
                listener(outputs, now)
            except Exception:  # noqa: BLE001 - observers must not stop the engine
                logger.exception("step listener %r failed", listener)

