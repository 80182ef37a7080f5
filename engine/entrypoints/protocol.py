"""The OpenAI wire protocol: request schemas (pydantic), the error shape, and a request's SamplingParams."""
from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar, Union

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cogvlm2.errors import (ImageError, ImageNotFoundError, ImagesDisabledError, ImageTooLargeError, InputError,
                            MessagesError, TooManyImagesError, UnreadableImageError, UnsupportedImageError)
from engine.sampling_params import RequestOutputKind, SamplingParams
from engine.structured_outputs import StructuredOutputsParams

T = TypeVar("T")
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
               500: "internal_error", 503: "service_unavailable"}
# cogvlm2's input errors as (status, code); the most specific class in an error's MRO wins.
INPUT_ERRORS: dict[type[InputError], tuple[int, str]] = {
    ImageTooLargeError: (400, "image_too_large"),
    UnreadableImageError: (400, "invalid_image"),
    ImageNotFoundError: (400, "image_not_found"),
    UnsupportedImageError: (400, "invalid_image"),
    ImagesDisabledError: (400, "images_disabled"),
    ImageError: (400, "invalid_image"),
    TooManyImagesError: (400, "too_many_images"),
    MessagesError: (400, "invalid_messages"),
    InputError: (400, "invalid_request"),
}


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


def from_input_error(error: InputError, param: str | None) -> ApiError:
    status, code = next(INPUT_ERRORS[cls] for cls in type(error).__mro__ if cls in INPUT_ERRORS)
    return ApiError(status, str(error), code=code, param=param)


# ---- request schemas ---------------------------------------------------------------------------------------------
class Strict(BaseModel):
    """A request schema that refuses unknown fields (parse_request turns them into 400s naming the field)."""
    model_config = ConfigDict(extra="forbid")


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ImageUrl(Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: ImageUrl


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


# OpenAI fields this server does not implement: a request that sends one gets a 400 naming it, never a reply that
# silently ignores it (any other unknown field is refused the same way).
UNSUPPORTED_FIELDS = ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "suffix",
                      "audio", "modalities", "prediction", "web_search_options", "reasoning_effort")


class StreamOptions(Strict):
    include_usage: bool = False


class JsonSchemaFormat(Strict):
    name: str
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingRequest(Strict):
    model: str | None = None
    user: str | None = None  # an end-user id, as OpenAI's: recorded nowhere, affects nothing
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None  # vLLM's extra field (engine/structured_outputs.py)
    guided_json: dict[str, Any] | str | None = None  # vLLM's older names for the same
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
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
    prompt_logprobs: int | None = None  # vLLM's extra field: logprobs of the prompt tokens (not when streaming)
    stream: bool = False
    stream_options: StreamOptions | None = None

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class CompletionRequest(SamplingRequest):
    prompt: str | list[str]
    logprobs: int | None = None
    echo: bool = False


class TokenizeRequest(Strict):
    """vLLM's /tokenize: a completions prompt or chat messages, tokenized as the engine would."""
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[int]


SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "presence_penalty",
                   "frequency_penalty", "repetition_penalty", "min_tokens", "ignore_eos", "skip_special_tokens",
                   "include_stop_str_in_output", "n", "logit_bias", "allowed_token_ids", "bad_words",
                   "prompt_logprobs")


def parse_request(body: bytes, schema: type[T]) -> T:
    try:
        return schema.model_validate_json(body, strict=True)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        if any(err["type"] == "json_invalid" for err in errors):
            raise ApiError(400, f"the request body is not valid JSON: {errors[0]['msg']}", code="invalid_json")
        unsupported = next((err for err in errors if err["type"] == "extra_forbidden"), None)
        if unsupported is not None:
            name = _loc(unsupported["loc"])
            why = "is not supported by this server" if name in UNSUPPORTED_FIELDS else "is not a known field"
            raise ApiError(400, f"'{name}' {why}", code="unsupported_field", param=name)
        described = "; ".join(f"{_loc(err['loc']) or 'body'}: {err['msg']}" for err in errors[:3])
        raise ApiError(400, f"the request does not match the schema: {described}", code="invalid_type",
                       param=_loc(errors[0]["loc"]) or None)


def _loc(loc: tuple) -> str:
    return ".".join(str(part) for part in loc)


# ---- sampling ----------------------------------------------------------------------------------------------------
def sampling_params(req: SamplingRequest, max_tokens: int | None, logprobs: int | None,
                    max_model_len: int, **overrides: Any) -> SamplingParams:
    if isinstance(max_tokens, int) and max_tokens > max_model_len:
        raise ApiError(400, f"max_tokens={max_tokens} is more than this model's context length "
                            f"(max_model_len={max_model_len})", code="max_tokens_too_large", param="max_tokens")
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise ApiError(400, f"best_of={req.best_of} is not supported: only best_of equal to n", code="unsupported",
                       param="best_of")
    if req.prompt_logprobs is not None and req.stream:
        raise ApiError(400, "prompt_logprobs is not available when streaming", code="unsupported",
                       param="prompt_logprobs")
    chosen = {name: getattr(req, name) for name in SAMPLING_FIELDS if getattr(req, name) is not None}
    chosen.update(overrides)
    structured, field_name = structured_outputs(req)
    try:
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, structured_outputs=structured,
                              output_kind=RequestOutputKind.DELTA, **chosen)  # the server sends what is new
    except ValueError as e:  # SamplingParams names the field first: "temperature must be >= 0, ..."
        param = field_name if str(e).startswith("structured_outputs") else str(e).split(" ", 1)[0]
        raise ApiError(400, str(e), code="invalid_sampling_params", param=param) from e


def structured_outputs(req: SamplingRequest) -> tuple[dict | None, str | None]:
    """The request's constraint as StructuredOutputsParams fields, and the request field it came from; a 400 when
    it comes from more than one."""
    sources = []
    if req.structured_outputs is not None:
        sources.append(("structured_outputs", req.structured_outputs))
    for name, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                      ("guided_grammar", "grammar")):
        if getattr(req, name) is not None:
            sources.append((name, {key: getattr(req, name)}))
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        sources.append(("response_format", {"json_object": True}))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise ApiError(400, "response_format of type json_schema needs 'json_schema'", code="invalid_type",
                           param="response_format.json_schema")
        sources.append(("response_format", {"json": fmt.json_schema.schema_}))
    if len(sources) > 1:
        raise ApiError(400, f"more than one output constraint: {[name for name, _ in sources]}",
                       code="invalid_sampling_params", param=sources[1][0])
    return (sources[0][1], sources[0][0]) if sources else (None, None)


def chat_logprobs(req: ChatCompletionRequest) -> int | None:
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs=true", code="invalid_sampling_params",
                       param="top_logprobs")
    return (req.top_logprobs or 0) if req.logprobs else None
