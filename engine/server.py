"""OpenAI-compatible HTTP server over AsyncLLM (FastAPI + uvicorn): `cogvlm2 serve --model DIR_OR_PRESET`.

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, GET /metrics.

Choices where the OpenAI API and CogVLM2 differ:
  * One image per conversation (CogVLM2 puts it before all text): more image parts -> 400 `too_many_images`.
    Images come as `data:image/...;base64,` URLs or, only under --allowed-local-media-path, `file://` paths;
    http(s) URLs are refused (the server never fetches remote URLs).
  * Messages: optional system (or developer) messages first, then user/assistant turns alternating and ending with
    a user turn. Earlier (user, assistant) pairs become CogVLM2 history. System text is prepended, with a newline,
    to the first user question, since CogVLM2's template has no system slot.
  * /v1/completions takes one text prompt and uses the "base" template (the prompt as is); /v1/chat/completions
    uses the model's chat template. max_tokens defaults to 16 for completions (as OpenAI) and to the rest of the
    context for chat; a max_tokens above max_model_len is refused with 400.
  * vLLM's extra sampling fields are accepted too: top_k, min_p, repetition_penalty, min_tokens, ignore_eos,
    stop_token_ids, skip_special_tokens, include_stop_str_in_output.
  * Status codes: malformed JSON -> 400 `invalid_json`; a body that does not match the schema (wrong types,
    missing fields) -> 422 `invalid_type`; a well-typed but invalid value (bad image, temperature < 0, ...) -> 400;
    missing or wrong API key -> 401; unknown model or route -> 404; body too large -> 413; timed out, shut down or
    crashed engine -> 503. Errors use OpenAI's shape {"error": {"message", "type", "param", "code"}}; in a stream
    that has started, an error arrives as a `data: {"error": ...}` event before `data: [DONE]`.
  * A client that disconnects (streaming or not) aborts its request, which frees its KV blocks.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import hmac
import io
import json
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Awaitable, ClassVar, Literal, TypeVar, Union
from urllib.parse import unquote, urlparse

import anyio
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from cogvlm2.errors import ImageError
from cogvlm2.image import load_image
from engine.async_llm import AsyncLLM, EngineDeadError
from engine.metrics import ServingMetrics
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

T = TypeVar("T")
DEFAULT_MAX_BODY_BYTES = 32 * 2 ** 20
# An oversized body is read and discarded up to this many times the limit, so the client (still sending) gets a
# clean 413 rather than a reset connection; beyond it the connection is simply closed.
BODY_DRAIN_FACTOR = 8
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
LOGPROB_FLOOR = -9999.0  # JSON has no -inf; OpenAI reports this value instead
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
               500: "internal_error", 503: "service_unavailable"}


# ---- errors ------------------------------------------------------------------------------------------------------
class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


# ---- request schemas ---------------------------------------------------------------------------------------------
class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageUrl(BaseModel):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageUrl


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str]
    logprobs: int | None = None
    echo: bool = False


SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "presence_penalty",
                   "frequency_penalty", "repetition_penalty", "min_tokens", "ignore_eos", "skip_special_tokens",
                   "include_stop_str_in_output", "n")


# ---- settings ----------------------------------------------------------------------------------------------------
@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    allowed_local_media_path: Path | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    request_timeout: float | None = None
    max_image_pixels: int = 40_000_000

    def __post_init__(self) -> None:
        if self.allowed_local_media_path is not None:
            folder = Path(self.allowed_local_media_path).resolve()
            if not folder.is_dir():
                raise ValueError(f"--allowed-local-media-path {self.allowed_local_media_path} is not a folder")
            self.allowed_local_media_path = folder
        if self.max_body_bytes < 1:
            raise ValueError(f"--max-body-bytes must be >= 1, got {self.max_body_bytes}")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise ValueError(f"--request-timeout must be > 0, got {self.request_timeout}")


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


def parse_request(body: bytes, schema: type[T]) -> T:
    try:
        return schema.model_validate_json(body, strict=True)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        if any(err["type"] == "json_invalid" for err in errors):
            raise ApiError(400, f"the request body is not valid JSON: {errors[0]['msg']}", code="invalid_json")
        described = "; ".join(f"{_loc(err['loc']) or 'body'}: {err['msg']}" for err in errors[:3])
        raise ApiError(422, f"the request does not match the schema: {described}", code="invalid_type",
                       param=_loc(errors[0]["loc"]) or None)


def _loc(loc: tuple) -> str:
    return ".".join(str(part) for part in loc)


# ---- images ------------------------------------------------------------------------------------------------------
def load_image_url(url: str, settings: ServerSettings) -> Image.Image:
    """Blocking (file reads, decoding): run it in a worker thread."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        data = _data_url_bytes(url)
    elif scheme == "file":
        data = _local_file_bytes(url, settings)
    elif scheme in ("http", "https"):
        raise ApiError(400, "remote image URLs are not supported: the server does not fetch URLs; send the image "
                            "inline as a data:image/...;base64, URL", code="remote_url_not_supported",
                       param="image_url")
    else:
        raise ApiError(400, f"unsupported image URL scheme {scheme!r}: use a data:image/...;base64, URL",
                       code="invalid_image_url", param="image_url")
    return _decode_image(data, settings.max_image_pixels)


def _data_url_bytes(url: str) -> bytes:
    header, comma, payload = url[len("data:"):].partition(",")
    if not comma:
        raise ApiError(400, "malformed data URL: no ',' before the data", code="invalid_image_url",
                       param="image_url")
    media_type, *options = header.split(";")
    if "base64" not in options:
        raise ApiError(400, "image data URLs must be base64-encoded: data:image/png;base64,...",
                       code="invalid_image_url", param="image_url")
    if media_type and not media_type.lower().startswith("image/"):
        raise ApiError(400, f"the data URL's media type {media_type!r} is not an image type", code="invalid_image",
                       param="image_url")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"the image data URL is not valid base64: {e}", code="invalid_base64",
                       param="image_url") from e


def _local_file_bytes(url: str, settings: ServerSettings) -> bytes:
    allowed = settings.allowed_local_media_path
    if allowed is None:
        raise ApiError(400, "file:// image URLs are disabled; start the server with --allowed-local-media-path",
                       code="local_files_disabled", param="image_url")
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise ApiError(400, f"file:// URLs must name a local path, got host {parsed.netloc!r}",
                       code="invalid_image_url", param="image_url")
    path = Path(unquote(parsed.path)).resolve()  # follows symlinks and '..' before the containment check
    if not path.is_relative_to(allowed):
        raise ApiError(400, "the image path is outside the allowed local media folder", code="path_not_allowed",
                       param="image_url")
    if not path.is_file():
        raise ApiError(400, f"image file not found: {url}", code="image_not_found", param="image_url")
    if path.stat().st_size > settings.max_body_bytes:
        raise ApiError(413, f"image file is larger than {settings.max_body_bytes} bytes", code="image_too_large",
                       param="image_url")
    return path.read_bytes()


def _decode_image(data: bytes, max_pixels: int) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as probe:  # header only: check the size before decoding
            width, height = probe.size
    except Image.DecompressionBombError as e:
        raise ApiError(400, f"the image has too many pixels: {e}", code="image_too_large", param="image_url") from e
    except Exception as e:  # noqa: BLE001 - PIL raises many types for non-images
        raise ApiError(400, f"the image data is not a readable image ({type(e).__name__})", code="invalid_image",
                       param="image_url") from e
    if width * height > max_pixels:
        raise ApiError(400, f"the image is {width}x{height} = {width * height} pixels, more than the limit of "
                            f"{max_pixels}", code="image_too_large", param="image_url")
    try:
        return load_image(data, max_pixels)
    except ImageError as e:
        raise ApiError(400, str(e), code="invalid_image", param="image_url") from e


# ---- chat messages -> CogVLM2 prompt ----------------------------------------------------------------------------
@dataclass
class Conversation:
    query: str
    history: list[tuple[str, str]]
    image_url: str | None


def conversation_from_messages(messages: list[ChatMessage]) -> Conversation:
    leading = 0
    while leading < len(messages) and messages[leading].role in ("system", "developer"):
        leading += 1
    system = [_text_of(m, i) for i, m in enumerate(messages[:leading])]
    turns = messages[leading:]
    _check_turns(turns, leading)
    image_urls = [(leading + i, url) for i, m in enumerate(turns) for url in _image_urls(m)]
    if len(image_urls) > 1:
        raise ApiError(400, f"CogVLM2 takes at most one image per conversation, got {len(image_urls)}",
                       code="too_many_images", param="messages")
    texts = [_text_of(m, leading + i) for i, m in enumerate(turns)]
    if system:
        texts[0] = "\n".join(system + [texts[0]])
    history = list(zip(texts[0:-1:2], texts[1:-1:2]))
    return Conversation(texts[-1], history, image_urls[0][1] if image_urls else None)


def _check_turns(turns: list[ChatMessage], offset: int) -> None:
    if not turns:
        raise ApiError(400, "messages need at least one user message", code="invalid_messages", param="messages")
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.role != expected:
            where = "system messages must come first" if message.role in ("system", "developer") else \
                "user and assistant messages must alternate, starting with user"
            raise ApiError(400, f"messages[{offset + i}] has role {message.role!r}: {where}",
                           code="invalid_messages", param=f"messages.{offset + i}.role")
    if turns[-1].role != "user":
        raise ApiError(400, "the last message must be a user message", code="invalid_messages", param="messages")


def _text_of(message: ChatMessage, index: int) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    if message.role != "user" and any(isinstance(p, ImagePart) for p in message.content):
        raise ApiError(400, f"messages[{index}]: only user messages may contain images", code="invalid_messages",
                       param=f"messages.{index}.content")
    return "\n".join(p.text for p in message.content if isinstance(p, TextPart))


def _image_urls(message: ChatMessage) -> list[str]:
    if not isinstance(message.content, list):
        return []
    return [p.image_url.url for p in message.content if isinstance(p, ImagePart)]


# ---- sampling ----------------------------------------------------------------------------------------------------
def sampling_params(req: _SamplingRequest, max_tokens: int | None, logprobs: int | None,
                    max_model_len: int) -> SamplingParams:
    if isinstance(max_tokens, int) and max_tokens > max_model_len:
        raise ApiError(400, f"max_tokens={max_tokens} is more than this model's context length "
                            f"(max_model_len={max_model_len})", code="max_tokens_too_large", param="max_tokens")
    chosen = {name: getattr(req, name) for name in SAMPLING_FIELDS if getattr(req, name) is not None}
    try:
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, **chosen)
    except ValueError as e:  # SamplingParams names the field first: "temperature must be >= 0, ..."
        raise ApiError(400, str(e), code="invalid_sampling_params", param=str(e).split(" ", 1)[0]) from e


def _chat_logprobs(req: ChatCompletionRequest) -> int | None:
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs=true", code="invalid_sampling_params",
                       param="top_logprobs")
    return (req.top_logprobs or 0) if req.logprobs else None


# ---- formatting outputs ------------------------------------------------------------------------------------------
@dataclass
class Result:
    """A request's output accumulated from its deltas."""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0

    def add(self, delta: RequestOutput) -> None:
        out = delta.outputs[0]
        self.text += out.text
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs or []
        self.finish_reason = out.finish_reason
        self.num_prompt_tokens = len(delta.prompt_token_ids)
        self.num_cached_tokens = delta.num_cached_tokens

    def usage(self) -> dict[str, Any]:
        return {"prompt_tokens": self.num_prompt_tokens, "completion_tokens": len(self.token_ids),
                "total_tokens": self.num_prompt_tokens + len(self.token_ids),
                "prompt_tokens_details": {"cached_tokens": self.num_cached_tokens}}


def _token_entry(tokenizer, token_id: int, logprob: float) -> dict[str, Any]:
    raw = tokenizer.token_bytes(token_id)
    return {"token": raw.decode("utf-8", errors="replace"), "logprob": max(logprob, LOGPROB_FLOOR),
            "bytes": list(raw)}


def _top(logprobs: dict[int, float], n: int) -> list[tuple[int, float]]:
    return sorted(logprobs.items(), key=lambda item: -item[1])[:n]


@dataclass
class OutputFormat:
    """How one endpoint shapes its JSON: streamed chunks, the usage chunk, the whole response."""
    id: str
    model: str
    created: int
    tokenizer: Any
    top_logprobs: int | None  # None: no logprobs asked
    include_usage: bool = False
    chunk_object: ClassVar[str]
    response_object: ClassVar[str]

    def choice(self, text: str, token_ids: list[int], logprobs: list[dict[int, float]] | None,
               finish_reason: str | None, streamed: bool) -> dict[str, Any]:
        raise NotImplementedError

    def opening(self) -> list[dict[str, Any]]:
        return []

    def chunk(self, delta: RequestOutput) -> dict[str, Any] | None:
        out = delta.outputs[0]
        if not out.text and not out.token_ids and not delta.finished:
            return None
        reason = out.finish_reason if delta.finished else None
        return self._envelope(self.chunk_object, [self.choice(out.text, out.token_ids, out.logprobs, reason, True)])

    def usage_chunk(self, result: Result) -> dict[str, Any]:
        return {**self._envelope(self.chunk_object, []), "usage": result.usage()}

    def response(self, result: Result) -> dict[str, Any]:
        choice = self.choice(result.text, result.token_ids, result.logprobs, result.finish_reason, False)
        return {**self._envelope(self.response_object, [choice]), "usage": result.usage()}

    def _envelope(self, obj: str, choices: list) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}


@dataclass
class ChatFormat(OutputFormat):
    chunk_object: ClassVar[str] = "chat.completion.chunk"
    response_object: ClassVar[str] = "chat.completion"

    def opening(self) -> list[dict[str, Any]]:
        first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return [self._envelope(self.chunk_object, [first])]

    def choice(self, text: str, token_ids: list[int], logprobs: list[dict[int, float]] | None,
               finish_reason: str | None, streamed: bool) -> dict[str, Any]:
        body = {"delta": {"content": text} if text else {}} if streamed else \
            {"message": {"role": "assistant", "content": text}}
        return {"index": 0, **body, "logprobs": self._logprobs(token_ids, logprobs), "finish_reason": finish_reason}

    def _logprobs(self, token_ids: list[int], logprobs: list[dict[int, float]] | None) -> dict | None:
        if self.top_logprobs is None:
            return None
        content = []
        for token_id, candidates in zip(token_ids, logprobs or []):
            entry = _token_entry(self.tokenizer, token_id, candidates[token_id])
            entry["top_logprobs"] = [_token_entry(self.tokenizer, t, lp)
                                     for t, lp in _top(candidates, self.top_logprobs)]
            content.append(entry)
        return {"content": content}


@dataclass
class CompletionFormat(OutputFormat):
    chunk_object: ClassVar[str] = "text_completion"
    response_object: ClassVar[str] = "text_completion"
    _text_offset: int = 0

    def choice(self, text: str, token_ids: list[int], logprobs: list[dict[int, float]] | None,
               finish_reason: str | None, streamed: bool) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": self._logprobs(token_ids, logprobs),
                "finish_reason": finish_reason}

    def _logprobs(self, token_ids: list[int], logprobs: list[dict[int, float]] | None) -> dict | None:
        if self.top_logprobs is None:
            return None
        tokens, token_logprobs, tops, offsets = [], [], [], []
        for token_id, candidates in zip(token_ids, logprobs or []):
            entry = _token_entry(self.tokenizer, token_id, candidates[token_id])
            tokens.append(entry["token"])
            token_logprobs.append(entry["logprob"])
            tops.append({_token_entry(self.tokenizer, t, lp)["token"]: max(lp, LOGPROB_FLOOR)
                         for t, lp in _top(candidates, self.top_logprobs)})
            offsets.append(self._text_offset)
            self._text_offset += len(entry["token"])
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}




def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


# ---- running one request -----------------------------------------------------------------------------------------
class Generation:
    """One engine request seen from HTTP: its deltas, its deadline, and what its end means for the client."""

    def __init__(self, llm: AsyncLLM, request_id: str, prompt: str | dict, params: SamplingParams,
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


# ---- the app -----------------------------------------------------------------------------------------------------
class ApiKeyMiddleware:
    """`Authorization: Bearer KEY` on every path but /health, compared in constant time."""

    def __init__(self, app, api_key: str):
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] == "/health" or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        error = ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                         code="invalid_api_key")
        await error.response()(scope, receive, send)

    def _authorized(self, scope) -> bool:
        given = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
        return hmac.compare_digest(given, self._expected)


@dataclass
class _App:
    llm: AsyncLLM
    settings: ServerSettings
    metrics: ServingMetrics

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.settings.model_name:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves "
                                f"{self.settings.model_name!r}", code="model_not_found", param="model")

    def check_alive(self) -> None:
        if not self.llm.is_running:
            raise ApiError(503, "the engine is not running", code="engine_unavailable")

    async def chat(self, request: Request) -> Response:
        req = parse_request(await read_body(request, self.settings.max_body_bytes), ChatCompletionRequest)
        self.check_model(req.model)
        conversation = conversation_from_messages(req.messages)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = sampling_params(req, max_tokens, _chat_logprobs(req), self.llm.max_model_len)
        image = None
        if conversation.image_url is not None:
            image = await asyncio.to_thread(load_image_url, conversation.image_url, self.settings)
        prompt = {"prompt": conversation.query, "history": conversation.history or None, "image": image}
        fmt = ChatFormat(f"chatcmpl-{uuid.uuid4().hex}", self.settings.model_name, int(time.time()),
                         self.llm.tokenizer, params.logprobs, _include_usage(req))
        return await self.run(request, req.stream, fmt, prompt, params)

    async def completions(self, request: Request) -> Response:
        req = parse_request(await read_body(request, self.settings.max_body_bytes), CompletionRequest)
        self.check_model(req.model)
        prompt = _single_prompt(req.prompt)
        if req.echo:
            raise ApiError(400, "echo is not supported", code="unsupported", param="echo")
        max_tokens = req.max_tokens if req.max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS
        params = sampling_params(req, max_tokens, req.logprobs, self.llm.max_model_len)
        fmt = CompletionFormat(f"cmpl-{uuid.uuid4().hex}", self.settings.model_name, int(time.time()),
                               self.llm.tokenizer, params.logprobs, _include_usage(req))
        return await self.run(request, req.stream, fmt, {"prompt": prompt, "template": "base"}, params)

    async def run(self, request: Request, stream: bool, fmt: OutputFormat, prompt: dict,
                  params: SamplingParams) -> Response:
        self.check_alive()
        gen = Generation(self.llm, fmt.id, prompt, params, self.settings.request_timeout)
        if not stream:
            result = await unless_disconnected(request, collect(gen))
            return JSONResponse(fmt.response(result)) if result is not None else _client_gone()
        first = await first_delta(request, gen)
        if first is None:
            return _client_gone()
        return EventStreamResponse(sse_events(gen, first, fmt), headers={"Cache-Control": "no-cache"})

    def models(self) -> dict[str, Any]:
        card = {"id": self.settings.model_name, "object": "model", "created": 0, "owned_by": "cogvlm2",
                "max_model_len": self.llm.max_model_len}
        return {"object": "list", "data": [card]}


def _include_usage(req: _SamplingRequest) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


def _single_prompt(prompt: str | list[str]) -> str:
    if isinstance(prompt, str):
        return prompt
    if len(prompt) != 1:
        raise ApiError(400, f"one prompt per request is supported, got {len(prompt)}", code="unsupported",
                       param="prompt")
    return prompt[0]


def _client_gone() -> Response:
    return Response(status_code=499)  # nginx's "client closed request": nobody reads it, the logs do


def build_app(llm: AsyncLLM, settings: ServerSettings) -> FastAPI:
    metrics = ServingMetrics(llm.stats)
    llm.add_step_listener(metrics.observe_step)
    state = _App(llm, settings, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        await llm.shutdown()

    app = FastAPI(title="CogVLM2 OpenAI-compatible server", lifespan=lifespan)
    app.state.server = state
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    _add_error_handlers(app)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await state.chat(request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await state.completions(request)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return state.models()

    @app.get("/health")
    async def health() -> dict[str, str]:
        state.check_alive()
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_: Request, error: EngineDeadError) -> JSONResponse:
        return ApiError(503, str(error), code="engine_unavailable").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return ApiError(error.status_code, str(error.detail), code="not_found" if error.status_code == 404
                        else None).response()

    @app.exception_handler(Exception)
    async def internal_error(_: Request, error: Exception) -> JSONResponse:
        return ApiError(500, f"internal error: {type(error).__name__}: {error}", code="internal_error").response()


# ---- the command -------------------------------------------------------------------------------------------------
class _Uvicorn(uvicorn.Server):
    """Stops the engine at the first shutdown signal: in-flight requests then end at once (503, or an error event
    in a stream) instead of holding the shutdown until uvicorn's graceful timeout."""

    def __init__(self, config: uvicorn.Config, llm: AsyncLLM):
        super().__init__(config)
        self.llm = llm
        self.loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        if self.loop is not None:
            self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self.llm.shutdown()))


def run_server(args: argparse.Namespace, engine_args: dict[str, Any]) -> int:
    settings = ServerSettings(
        model_name=args.served_model_name or args.model or "demo", api_key=args.api_key,
        allowed_local_media_path=args.allowed_local_media_path, max_body_bytes=args.max_body_bytes,
        request_timeout=args.request_timeout, max_image_pixels=args.max_image_pixels)
    llm = AsyncLLM(args.model, **engine_args)
    print(f"serving {settings.model_name!r} on http://{args.host}:{args.port} "
          f"({llm.stats()['num_total_blocks']} KV blocks, max_model_len {llm.max_model_len})", file=sys.stderr)
    config = uvicorn.Config(build_app(llm, settings), host=args.host, port=args.port, log_level=args.log_level,
                            access_log=not args.disable_access_log, timeout_graceful_shutdown=5)
    _Uvicorn(config, llm).run()
    return 0
