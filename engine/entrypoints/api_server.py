"""The HTTP app: FastAPI routes over OpenAIServing, the API-key middleware, errors in OpenAI's shape, and
`run_server` (uvicorn) for `cogvlm2 serve`."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import importlib.metadata
import logging
import sys
import uuid
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.async_llm import AsyncLLM, EngineDeadError
from engine.entrypoints.protocol import ApiError
from engine.entrypoints.serving import OpenAIServing
from engine.entrypoints.settings import ServerSettings
from engine.metrics import ServingMetrics, StatsLogger, metrics_settings

logger = logging.getLogger(__name__)
MAX_REQUEST_ID_CHARS = 128
ALL_INTERFACES = "0.0.0.0"


def package_version() -> str:
    try:
        return importlib.metadata.version("cogvlm2-engine")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was not installed
        return "unknown"


class ApiKeyMiddleware:
    """`Authorization: Bearer KEY` on the OpenAI routes (/v1/...), and on /metrics if asked; the scheme in any case
    (RFC 7235), the key compared in constant time. Like vLLM, the other routes (/health, /tokenize, ...) are open."""

    def __init__(self, app, api_key: str, metrics_require_key: bool = False):
        self.app = app
        self._expected = api_key.encode()
        self._metrics_require_key = metrics_require_key

    def _guarded(self, path: str) -> bool:
        return path.startswith("/v1/") or (self._metrics_require_key and path == "/metrics")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not self._guarded(scope["path"]) or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        error = ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                         code="invalid_api_key")
        await error.response()(scope, receive, send)

    def _authorized(self, scope) -> bool:
        given = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
        scheme, _, key = given.strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(key.strip(), self._expected)


class RequestIdMiddleware:
    """The request's id: the client's X-Request-Id, else a new one; kept in request.state.request_id and sent back
    in the response's X-Request-Id."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((value for name, value in scope["headers"] if name == b"x-request-id"), b"")
        request_id = given.decode("latin-1").strip()[:MAX_REQUEST_ID_CHARS] or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode("latin-1")))
            await send(message)

        await self.app(scope, receive, send_with_id)


def build_app(llm: AsyncLLM, settings: ServerSettings) -> FastAPI:
    metrics = ServingMetrics(llm.stats, settings.model_name, llm.max_model_len, settings.metrics.prefix)
    llm.add_step_listener(metrics.observe_step)
    stats_logger = StatsLogger(metrics, settings.metrics.log_stats_interval, settings.metrics.log_stats_level)
    state = OpenAIServing(llm, settings)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        stats_log = asyncio.create_task(stats_logger.run()) if settings.metrics.log_stats else None
        yield
        if stats_log is not None:
            stats_log.cancel()
        await asyncio.to_thread(llm.shutdown)  # joins the engine thread: off the loop

    app = FastAPI(title="CogVLM2 OpenAI-compatible server", lifespan=lifespan)
    app.state.server = state
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key,
                           metrics_require_key=settings.metrics_require_key)
    app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins, allow_methods=settings.allowed_methods,
                       allow_headers=settings.allowed_headers, allow_credentials=settings.allow_credentials)
    app.add_middleware(RequestIdMiddleware)  # outermost: every answer, a 401 too, carries the id
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

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        return await state.tokenize(request)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        return await state.detokenize(request)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": package_version()}

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
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        """The traceback goes to the log under an id the client is told; the exception text is not sent."""
        error_id = getattr(request.state, "request_id", None) or request.headers.get("x-request-id") or \
            f"err-{uuid.uuid4().hex[:16]}"
        logger.error("internal error on %s %s (id %s)", request.method, request.url.path, error_id, exc_info=error)
        return ApiError(500, f"internal server error (id {error_id}; see the server log)",
                        code="internal_error").response()


# ---- the command -------------------------------------------------------------------------------------------------
def _log_engine_to_stderr(level: str) -> None:
    """uvicorn configures only its own loggers: the engine's (the stats line among them) get a handler here."""
    engine_logger = logging.getLogger("engine")
    if not engine_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s"))
        engine_logger.addHandler(handler)
    engine_logger.setLevel(level.upper())


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
            self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(asyncio.to_thread(self.llm.shutdown)))


def run_server(args: argparse.Namespace, engine_args: dict[str, Any]) -> int:
    settings = ServerSettings(
        model_name=args.served_model_name or args.model or "demo", api_key=args.api_key,
        allowed_local_media_path=args.allowed_local_media_path, max_body_bytes=args.max_body_bytes,
        request_timeout=args.request_timeout, max_image_pixels=args.max_image_pixels,
        metrics_require_key=args.metrics_require_key, allowed_origins=args.allowed_origins,
        allowed_methods=args.allowed_methods, allowed_headers=args.allowed_headers,
        allow_credentials=args.allow_credentials)
    settings.metrics = metrics_settings(args)
    _log_engine_to_stderr(args.log_level)
    llm = AsyncLLM(args.model, **engine_args)
    settings.image_size = llm.config.vision.image_size
    host = args.host or ALL_INTERFACES  # vLLM's default: no --host listens on every interface
    print(f"serving {settings.model_name!r} on http://{host}:{args.port} "
          f"({llm.stats()['num_total_blocks']} KV blocks, max_model_len {llm.max_model_len})", file=sys.stderr)
    if args.host is None and not settings.api_key:
        print(f"warning: listening on all interfaces without an API key: anyone who can reach port {args.port} can "
              f"use the model (--host 127.0.0.1 for this machine only, or --api-key)", file=sys.stderr)
    config = uvicorn.Config(build_app(llm, settings), host=host, port=args.port, log_level=args.log_level,
                            access_log=not args.disable_access_log, timeout_graceful_shutdown=5)
    _Uvicorn(config, llm).run()
    return 0
