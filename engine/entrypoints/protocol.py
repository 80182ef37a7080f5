"""The OpenAI wire protocol: request schemas (pydantic), the error shape, and a request's SamplingParams."""
from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar, Union

from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError

from cogvlm2.errors import (ImageError, ImageNotFoundError, ImagesDisabledError, ImageTooLargeError, InputError,
                            MessagesError, TooManyImagesError, UnreadableImageError, UnsupportedImageError)
from engine.sampling_params import SamplingParams

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


class SamplingRequest(BaseModel):
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


SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "presence_penalty",
                   "frequency_penalty", "repetition_penalty", "min_tokens", "ignore_eos", "skip_special_tokens",
                   "include_stop_str_in_output", "n")


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


# ---- sampling ----------------------------------------------------------------------------------------------------
def sampling_params(req: SamplingRequest, max_tokens: int | None, logprobs: int | None,
                    max_model_len: int) -> SamplingParams:
    if isinstance(max_tokens, int) and max_tokens > max_model_len:
        raise ApiError(400, f"max_tokens={max_tokens} is more than this model's context length "
                            f"(max_model_len={max_model_len})", code="max_tokens_too_large", param="max_tokens")
    chosen = {name: getattr(req, name) for name in SAMPLING_FIELDS if getattr(req, name) is not None}
    try:
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, **chosen)
    except ValueError as e:  # SamplingParams names the field first: "temperature must be >= 0, ..."
        raise ApiError(400, str(e), code="invalid_sampling_params", param=str(e).split(" ", 1)[0]) from e


def chat_logprobs(req: ChatCompletionRequest) -> int | None:
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs=true", code="invalid_sampling_params",
                       param="top_logprobs")
    return (req.top_logprobs or 0) if req.logprobs else None
