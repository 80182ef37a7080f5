"""asyncio front end of the engine: `async for out in AsyncLLM(...).generate(prompt, params, request_id)`.

The LLMEngine lives in one background thread (its forward pass is blocking CPU work), so the event loop never
waits on the model. Callers hand requests to that thread through a thread-safe queue; after every step the thread
passes the step's outputs back to the event loop with `call_soon_threadsafe`, where they are routed to the
waiting callers. A caller that stops iterating (breaks, closes the generator, is cancelled) aborts its request,
which frees its KV blocks. What a caller receives follows its SamplingParams.output_kind (vLLM's): the output so
far (CUMULATIVE, the default), only what is new (DELTA, what the HTTP server streams), or the finished output.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from engine.config import EngineArgs
from engine.outputs import RequestOutput
from engine.sampling_params import RequestOutputKind, SamplingParams

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
    kind: RequestOutputKind
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    # DELTA: the deltas not yet taken by the caller, merged (a slow caller costs no extra outputs); otherwise the
    # whole output so far.
    pending: RequestOutput | None = None
    error: str | None = None

    def put(self, delta: RequestOutput) -> None:
        if self.pending is None:
            self.pending = delta.copy()
            self.pending.request_id = self.request_id
        else:
            self.pending.add(delta)
        if self.kind is not RequestOutputKind.FINAL_ONLY or delta.finished:
            self.ready.set()

    def take(self) -> RequestOutput:
        if self.kind is RequestOutputKind.DELTA:
            delta, self.pending = self.pending, None
            return delta
        return self.pending.copy()  # the caller may keep it: later steps extend `pending`, not this copy


def _output_kind(params: SamplingParams | dict | None) -> RequestOutputKind:
    """The request's output kind, read before the engine validates the rest (a bad value fails it there)."""
    kind = params.output_kind if isinstance(params, SamplingParams) else \
        params.get("output_kind") if isinstance(params, dict) else None
    return kind if isinstance(kind, RequestOutputKind) else RequestOutputKind.CUMULATIVE


class AsyncLLM:
    """Streams RequestOutputs to many concurrent asyncio callers from one engine thread.

    The model loads in the engine thread. Constructed outside an event loop, the constructor waits for it and
    raises what loading raised; constructed inside a running loop (a FastAPI lifespan, say) it returns at once,
    and `generate` (or `await llm.ready()`, or the `await AsyncLLM.create(...)` factory) waits without blocking
    the loop. It serves one event loop at a time: a later loop may take over once the earlier one has no open
    request. `llm.shutdown()` (or `async with`) stops it; a shut-down or crashed engine makes every waiting
    caller raise EngineDeadError.
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
        self._started = threading.Event()  # set once loading finished, or failed (then _startup_error is set)
        self._startup_error: BaseException | None = None
        self._thread = threading.Thread(target=self._engine_thread, name="cogvlm2-engine", daemon=True,
                                        args=(model, engine_args))
        self._thread.start()
        if not _in_running_loop():
            self._loaded_engine()

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> "AsyncLLM":
        """vLLM's constructor: `AsyncLLM.from_engine_args(AsyncEngineArgs(model=...))`."""
        return cls(**dataclasses.asdict(engine_args))

    @classmethod
    async def create(cls, model: str | None = None, **engine_args: Any) -> "AsyncLLM":
        """Constructs and waits for the model without blocking the running loop."""
        llm = cls(model, **engine_args)
        await llm.ready()
        return llm

    async def ready(self) -> None:
        """Waits (without blocking the loop) until the model is loaded; raises what loading raised."""
        if not self._started.is_set():
            await asyncio.to_thread(self._started.wait)
        self._loaded_engine()

    def _loaded_engine(self):
        """The engine, waiting for it if it is still loading (blocking: from a loop, await ready() first)."""
        self._started.wait()
        if self._startup_error is not None:
            raise self._startup_error
        return self.engine

    # ---- read-only engine facts (fixed once loaded, safe from any thread) -------------------------------------
    @property
    def tokenizer(self):
        return self._loaded_engine().tokenizer

    async def get_tokenizer(self):
        """vLLM's coroutine: `tokenizer = await llm.get_tokenizer()`."""
        await self.ready()
        return self.tokenizer

    @property
    def processor(self):
        """The engine's prompt processor (stateless, safe from any thread): a server may process prompts itself
        and pass the ProcessedPrompt."""
        return self._loaded_engine().processor

    @property
    def config(self):
        return self._loaded_engine().config

    @property
    def max_model_len(self) -> int:
        return self._loaded_engine().max_model_len

    @property
    def grammars(self):
        """The engine's grammar compiler (thread-safe): servers validate a constraint before submitting it."""
        return self._loaded_engine().grammars

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
        """Yields the request's outputs as its output_kind says; the last one has `finished` and `finish_reason`
        set ("error" with `.error` for a bad request)."""
        await self.ready()
        request_id = request_id if request_id is not None else f"req-{uuid.uuid4().hex}"
        engine_id, stream = self._open_stream(request_id, _output_kind(sampling_params))
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

    def shutdown(self) -> None:
        """Stop the engine thread (after its current step, or its loading); callers still waiting get
        EngineDeadError. Idempotent."""
        if self._thread.is_alive():
            self._commands.put(_STOP)
            self._thread.join()
        self._mark_dead("the engine was shut down")

    async def __aenter__(self) -> "AsyncLLM":
        await self.ready()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self.shutdown()

    def _open_stream(self, request_id: str, kind: RequestOutputKind) -> tuple[str, _Stream]:
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
        stream = _Stream(request_id, kind)
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
    def _engine_thread(self, model: str | None, engine_args: dict) -> None:
        try:
            from engine.llm_engine import LLMEngine
            self.engine = LLMEngine(model, **engine_args)
            self._stats = self.engine.stats()
        except BaseException as e:  # noqa: BLE001 - re-raised by the constructor, ready() and generate()
            self._startup_error = e
            self._dead_reason = f"the engine failed to start: {type(e).__name__}: {e}"
            return
        finally:
            self._started.set()
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


def _in_running_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
