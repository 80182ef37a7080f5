"""One request's lifecycle over HTTP: reading the body, the chat and completions handlers, the engine request with
its deadline, and the answer as one JSON response or a server-sent-event stream; a client that disconnects
aborts its request."""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, TypeVar

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from cogvlm2.chat import conversation_from_messages
from cogvlm2.errors import InputError, MessagesError
from cogvlm2.processor import ProcessedPrompt
from engine.async_llm import AsyncLLM, EngineDeadError
from engine.entrypoints.formatting import ChatFormat, CompletionFormat, OutputFormat, Result
from engine.entrypoints.media import load_image_url
from engine.entrypoints.protocol import (ApiError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                         TokenizeRequest, chat_logprobs, from_input_error, parse_request,
                                         sampling_params, structured_outputs)
from engine.entrypoints.settings import ServerSettings
from engine.outputs import RequestOutput
from engine.llm_engine import INTERNAL_ERROR
from engine.sampling_params import SamplingParams

T = TypeVar("T")
# An oversized body is read and discarded up to this many times the limit, so the client (still sending) gets a
# clean 413 rather than a reset connection; beyond it the connection is simply closed.
BODY_DRAIN_FACTOR = 8
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
SSE_DONE = "data: [DONE]\n\n"


# ---- reading the body --------------------------------------------------------------------------------------------
async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit * BODY_DRAIN_FACTOR:
        raise _body_too_large(limit)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
            elif size > limit * BODY_DRAIN_FACTOR:
                break
    except ClientDisconnect as e:
        raise ApiError(400, "the client disconnected while sending the request", code="client_disconnected") from e
    if size > limit:
        raise _body_too_large(limit)
    return b"".join(chunks)


def _body_too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body is larger than the server's limit of {limit} bytes",
                    code="request_too_large")


# ---- running one request -----------------------------------------------------------------------------------------
def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


class Generation:
    """One engine request seen from HTTP: its deltas, its deadline, and what its end means for the client."""

    def __init__(self, llm: AsyncLLM, request_id: str, prompt: str | dict | ProcessedPrompt, params: SamplingParams,
                 timeout: float | None):
        self.llm, self.request_id, self.timeout = llm, request_id, timeout
        self.timed_out = False
        self._deltas = llm.generate(prompt, params, request_id)
        self._timer = asyncio.get_running_loop().call_later(timeout, self._expire) if timeout else None

    def _expire(self) -> None:
        self.timed_out = True
        asyncio.ensure_future(self.llm.abort(self.request_id))

    async def next(self) -> RequestOutput | None:
        try:
            return await anext(self._deltas)
        except StopAsyncIteration:
            return None

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        await self._deltas.aclose()

    def failure(self, delta: RequestOutput) -> ApiError | None:
        reason = delta.outputs[0].finish_reason
        if reason == "error":
            if (delta.error or "").startswith(INTERNAL_ERROR):
                return ApiError(500, delta.error, code="internal_error")
            return ApiError(400, delta.error or "the request failed", code="invalid_request")
        if reason == "abort":
            if self.timed_out:
                return ApiError(503, f"the request timed out after {self.timeout:g} s", code="request_timeout")
            return ApiError(503, "the request was aborted", code="aborted")
        return None


async def collect(gen: Generation) -> Result:
    result = Result()
    try:
        while (delta := await gen.next()) is not None:
            result.add(delta)
            if delta.finished:
                if (error := gen.failure(delta)) is not None:
                    raise error
                break
    finally:
        await gen.close()
    return result


async def sse_events(gen: Generation, first: RequestOutput, fmt: OutputFormat) -> AsyncIterator[str]:
    result = Result()
    try:
        for chunk in fmt.opening():
            yield _sse(chunk)
        delta: RequestOutput | None = first
        while delta is not None:
            if delta.finished and (error := gen.failure(delta)) is not None:
                yield _sse(error.body())
                break
            result.add(delta)
            if (chunk := fmt.chunk(delta)) is not None:
                yield _sse(chunk)
            if delta.finished:
                if fmt.include_usage:
                    yield _sse(fmt.usage_chunk(result))
                break
            delta = await gen.next()
        yield SSE_DONE
    except EngineDeadError as e:
        yield _sse(ApiError(503, str(e), code="engine_unavailable").body())
        yield SSE_DONE
    finally:
        await gen.close()


async def first_delta(request: Request, gen: Generation) -> RequestOutput | None:
    """A stream's first delta, awaited before any header is sent so that a request the engine refuses still gets
    its 4xx. None (and the request aborted) if the client left meanwhile."""
    try:
        first = await unless_disconnected(request, gen.next())
        if first is not None and first.finished and (error := gen.failure(first)) is not None:
            raise error
    except BaseException:
        await gen.close()
        raise
    if first is None:
        await gen.close()
    return first


class EventStreamResponse(StreamingResponse):
    """Server-sent events that stop (and so abort the request) as soon as the client disconnects, even while
    waiting for the next token, whatever ASGI spec version the server speaks."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as tasks:
                async def stream_then_stop() -> None:
                    with contextlib.suppress(OSError):  # the client went away mid-send
                        await self.stream_response(send)
                    tasks.cancel_scope.cancel()

                tasks.start_soon(stream_then_stop)
                await self.listen_for_disconnect(receive)
                tasks.cancel_scope.cancel()
        finally:
            await self.body_iterator.aclose()


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Await `work`; if the client disconnects first, cancel it (which aborts its request) and return None."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return task.result() if not task.cancelled() else None


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ---- the endpoints ------------------------------------------------------------------------------------------------
@dataclass
class OpenAIServing:
    """The endpoints' logic, over one AsyncLLM and the server's settings."""
    llm: AsyncLLM
    settings: ServerSettings

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.settings.model_name:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves "
                                f"{self.settings.model_name!r}", code="model_not_found", param="model")

    def check_alive(self) -> None:
        if not self.llm.is_running:
            raise ApiError(503, "the engine is not running", code="engine_unavailable")

    async def check_constraint(self, req, params: SamplingParams) -> None:
        """A constraint llguidance rejects is a 400 naming the request field it came from (compiled off the event
        loop; the engine's admission then finds it cached)."""
        if params.structured_outputs is None:
            return
        try:
            await asyncio.to_thread(self.llm.grammars.validate, params.structured_outputs)
        except ValueError as e:
            raise ApiError(400, str(e), code="invalid_structured_output", param=structured_outputs(req)[1]) from e

    async def process(self, query: str, **kwargs: Any) -> ProcessedPrompt:
        """The prompt's tokens and image, off the event loop (and off the engine thread)."""
        try:
            return await asyncio.to_thread(self.llm.processor, query, **kwargs)
        except InputError as e:
            raise from_input_error(e, None) from e

    async def _chat_prompt(self, messages: list) -> ProcessedPrompt:
        try:
            conversation = conversation_from_messages([message.model_dump() for message in messages])
        except MessagesError as e:
            raise from_input_error(e, e.param) from e
        image = None
        if conversation.image_url is not None:
            image = await asyncio.to_thread(load_image_url, conversation.image_url, self.settings)
        return await self.process(conversation.query, image=image, history=conversation.history or None)

    def check_context(self, num_prompt_tokens: int, max_tokens: int | None, field: str) -> None:
        """A prompt that, with max_tokens, does not fit the context is a 400 before it reaches the engine."""
        limit = self.llm.max_model_len
        wanted = num_prompt_tokens + (max_tokens or 1)
        if wanted > limit:
            raise ApiError(400, f"this model's maximum context length is {limit} tokens, but {wanted} were asked "
                                f"for ({num_prompt_tokens} in the {field}, {max_tokens or 1} in the completion); "
                                f"shorten the {field} or max_tokens", code="context_length_exceeded", param=field)

    async def chat(self, request: Request) -> Response:
        req = parse_request(await read_body(request, self.settings.max_body_bytes), ChatCompletionRequest)
        self.check_model(req.model)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = sampling_params(req, max_tokens, chat_logprobs(req), self.llm.max_model_len)
        await self.check_constraint(req, params)
        prompt = await self._chat_prompt(req.messages)
        self.check_context(prompt.num_tokens, params.max_tokens, "messages")
        fmt = ChatFormat(f"chatcmpl-{request.state.request_id}", self.settings.model_name, int(time.time()),
                         self.llm.tokenizer, params.logprobs, req.include_usage(), params.n)
        return await self.run(request, req.stream, fmt, prompt, params)

    async def completions(self, request: Request) -> Response:
        req = parse_request(await read_body(request, self.settings.max_body_bytes), CompletionRequest)
        self.check_model(req.model)
        prompt = _single_prompt(req.prompt)
        max_tokens = req.max_tokens if req.max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS
        # echo with logprobs reports the prompt's tokens too (OpenAI's legacy completions behaviour)
        echo_logprobs = {"prompt_logprobs": req.logprobs} if req.echo and req.logprobs is not None \
            and req.prompt_logprobs is None else {}
        params = sampling_params(req, max_tokens, req.logprobs, self.llm.max_model_len, **echo_logprobs)
        await self.check_constraint(req, params)
        fmt = CompletionFormat(f"cmpl-{request.state.request_id}", self.settings.model_name, int(time.time()),
                               self.llm.tokenizer, params.logprobs, req.include_usage(), params.n,
                               echo=prompt if req.echo else None)
        processed = await self.process(prompt, template="base")
        self.check_context(processed.num_tokens, params.max_tokens, "prompt")
        return await self.run(request, req.stream, fmt, processed, params)

    async def run(self, request: Request, stream: bool, fmt: OutputFormat, prompt: ProcessedPrompt,
                  params: SamplingParams) -> Response:
        self.check_alive()
        # the engine's id stays unique when clients reuse an X-Request-Id
        gen = Generation(self.llm, f"{fmt.id}-{uuid.uuid4().hex[:8]}", prompt, params, self.settings.request_timeout)
        if not stream:
            result = await unless_disconnected(request, collect(gen))
            return JSONResponse(fmt.response(result)) if result is not None else _client_gone()
        first = await first_delta(request, gen)
        if first is None:
            return _client_gone()
        return EventStreamResponse(sse_events(gen, first, fmt), headers={"Cache-Control": "no-cache"})

    async def tokenize(self, request: Request) -> dict[str, Any]:
        req = parse_request(await read_body(request, self.settings.max_body_bytes), TokenizeRequest)
        self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise ApiError(400, "give exactly one of 'prompt' and 'messages'", code="invalid_request", param="prompt")
        if req.prompt is not None:
            tokens = (await self.process(req.prompt, template="base")).input_ids if req.add_special_tokens \
                else self.llm.tokenizer.encode(req.prompt)
        else:
            tokens = (await self._chat_prompt(req.messages)).input_ids
        body: dict[str, Any] = {"count": len(tokens), "max_model_len": self.llm.max_model_len, "tokens": tokens}
        if req.return_token_strs:
            body["token_strs"] = [self.llm.tokenizer.token_bytes(t).decode("utf-8", errors="replace")
                                  for t in tokens]
        return body

    async def detokenize(self, request: Request) -> dict[str, Any]:
        req = parse_request(await read_body(request, self.settings.max_body_bytes), DetokenizeRequest)
        self.check_model(req.model)
        vocab = self.llm.config.vocab_size
        outside = [t for t in req.tokens if not 0 <= t < vocab]
        if outside:
            raise ApiError(400, f"tokens outside the vocabulary (size {vocab}): {outside[:5]}", code="invalid_tokens",
                           param="tokens")
        return {"prompt": self.llm.tokenizer.decode(req.tokens)}

    def models(self) -> dict[str, Any]:
        card = {"id": self.settings.model_name, "object": "model", "created": 0, "owned_by": "cogvlm2",
                "max_model_len": self.llm.max_model_len}
        return {"object": "list", "data": [card]}


def _single_prompt(prompt: str | list[str]) -> str:
    if isinstance(prompt, str):
        return prompt
    if len(prompt) != 1:
        raise ApiError(400, f"one prompt per request is supported, got {len(prompt)}", code="unsupported",
                       param="prompt")
    return prompt[0]


def _client_gone() -> Response:
    return Response(status_code=499)  # nginx's "client closed request": nobody reads it, the logs do
