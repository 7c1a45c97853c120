"""The HTTP front end: FastAPI routes over an `InferenceServer`, and uvicorn to run them.

Native routes: POST /v1/generate, POST /v1/score, GET /health, GET /metrics (Prometheus, through
`prometheus_client`); OpenAI-compatible routes from `serve/openai.py` beside them.
Status codes (native routes): 422 names the offending field (malformed JSON, out-of-range values, NaN or
Infinity, lone surrogates — FastAPI's validation, made JSON-safe), 400 for a body that is not parseable
at all, 413 when the prompt does not fit the context (with the limit), 503 + Retry-After when the queue
is full, 499 (logged only; the client is gone) when the client disconnects mid-request. The OpenAI
routes answer in OpenAI's error shape instead (see there). No input is a 500: that is an engine failure.
FastAPI and uvicorn are the optional extra `serve`; this module imports them, so import it lazily.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from scalelab.serve.httputil import CLIENT_CLOSED, RETRY_AFTER_SECONDS, route_label, until_disconnected
from scalelab.serve.openai import create_router, invalid_body, is_openai_path, openai_error
from scalelab.serve.sampling import SamplingParams
from scalelab.serve.server import ClientGone, InferenceServer, PromptTooLong, QueueFull, ServerError
from scalelab.serve.validation import MAX_SEED, Finite, Text, safe_errors

log = logging.getLogger(__name__)


class GenerateRequest(BaseModel):
    """POST /v1/generate body. `seed` makes sampling reproducible; temperature 0 (or < 1e-5) is greedy."""

    model_config = ConfigDict(extra="forbid")
    prompt: Text
    max_tokens: int = Field(32, ge=1, le=65536)
    temperature: Annotated[Finite, Field(ge=0.0, le=100.0)] = 1.0
    top_k: int | None = Field(None, ge=1, le=1 << 20)
    top_p: Annotated[Finite, Field(gt=0.0, le=1.0)] = 1.0
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    ignore_eos: bool = False


class ScoreRequest(BaseModel):
    """POST /v1/score body: the text whose log-likelihood is wanted."""

    model_config = ConfigDict(extra="forbid")
    text: Annotated[Text, Field(min_length=1)]


class _CountRequests:
    """ASGI middleware: count and time responses by route template and status (pure ASGI, so it keeps
    disconnect detection and sees streamed responses to their end)."""

    def __init__(self, app: Any, server: InferenceServer) -> None:
        self.app, self.server = app, server

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}
        t0 = time.perf_counter()

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.server.metrics.request_done(
                route_label(scope), str(scope.get("method", "")), status["code"], time.perf_counter() - t0
            )


def _error(status: int, field: str | None, message: str, **extra: Any) -> JSONResponse:
    detail: dict[str, Any] = {"message": message, **extra}
    if field is not None:
        detail["field"] = field
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status == 503 else None
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def create_app(server: InferenceServer, *, manage_lifecycle: bool = True) -> FastAPI:
    """The FastAPI app for `server`; with `manage_lifecycle` it starts/stops the engine with the app."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if manage_lifecycle:
            server.start()
        try:
            yield
        finally:
            if manage_lifecycle:
                server.stop()

    app = FastAPI(title="scalelab serve", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = safe_errors(exc.errors())
        if is_openai_path(request.url.path):
            return invalid_body(errors)
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if is_openai_path(request.url.path):
            return openai_error(exc.status_code, message, "invalid_request_error")
        return JSONResponse({"detail": message}, status_code=exc.status_code, headers=exc.headers)

    async def handle(request: Request, coro: Any) -> Any:
        try:
            return JSONResponse(await coro)  # a plain dict: skips FastAPI's jsonable_encoder walk
        except PromptTooLong as err:
            return _error(413, err.field, str(err), limit_tokens=err.limit, got_tokens=err.tokens)
        except QueueFull as err:
            return _error(503, None, f"{err}; retry after {RETRY_AFTER_SECONDS} s")
        except ClientGone:
            log.info("client of %s disconnected; request dropped", request.url.path)
            return _error(CLIENT_CLOSED, None, "client closed the request")
        except ServerError as err:
            return _error(500, None, str(err))

    @app.post("/v1/generate")
    async def generate(body: GenerateRequest, request: Request) -> Any:
        params = SamplingParams(
            body.max_tokens, body.temperature, body.top_k, body.seed, body.top_p, body.ignore_eos
        )
        return await handle(request, server.generate(body.prompt, params, until_disconnected(request)))

    @app.post("/v1/score")
    async def score(body: ScoreRequest, request: Request) -> Any:
        return await handle(request, server.score(body.text, until_disconnected(request)))

    @app.get("/health")
    async def health() -> Any:
        info = server.health()
        return JSONResponse(info, status_code=200 if info["status"] == "ok" else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.include_router(create_router(server))
    return _CountRequests(app, server)  # type: ignore[return-value]


def check_loopback(host: str, allow_remote: bool) -> None:
    """Refuse a non-loopback bind unless asked for explicitly (the server has no authentication)."""
    import ipaddress

    if allow_remote or host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    from scalelab.errors import SpecError

    raise SpecError(
        f"--host {host}: not a loopback address; the server has no authentication — pass --allow-remote "
        "to expose it on purpose"
    )


#: how long a Python thread may hold the GIL while another waits for it (Python's default is 5 ms): the
#: engine thread gives up and retakes the GIL around every torch operation, so each retake could wait
#: up to the whole interval while the event loop runs Python (requests, responses), and vice versa
GIL_SWITCH_SECONDS = 0.0005


def run(server: InferenceServer, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until interrupted (blocking). The process is the server's, so this also shortens its GIL
    switch interval to `GIL_SWITCH_SECONDS` for the time it serves, and moves everything loaded so far
    (model, libraries, app) out of the garbage collector's sight (`gc.freeze`): a full collection of it
    stopped both the event loop and the engine for ~150 ms, once every few hundred requests — the
    slowest requests under load (docs/serving.md); now a collection sees only what serving allocates."""
    config = uvicorn.Config(create_app(server), host=host, port=port, log_level="warning", access_log=False)
    previous = sys.getswitchinterval()
    sys.setswitchinterval(GIL_SWITCH_SECONDS)
    gc.collect()
    gc.freeze()
    try:
        uvicorn.Server(config).run()
    finally:
        gc.unfreeze()
        sys.setswitchinterval(previous)


class BackgroundServer:
    """uvicorn in a daemon thread on a free loopback port (tests, benchmarks): `with BackgroundServer(s) as bg:`."""

    def __init__(self, server: InferenceServer, host: str = "127.0.0.1", port: int = 0) -> None:
        config = uvicorn.Config(
            create_app(server), host=host, port=port, log_level="warning", access_log=False, lifespan="on"
        )
        self._uv = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._uv.run, name="scalelab-serve-http", daemon=True)
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._uv.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        sock = self._uv.servers[0].sockets[0]
        self.port = int(sock.getsockname()[1])
        return self

    def __exit__(self, *exc: object) -> None:
        self._uv.should_exit = True
        self._thread.join(15)


@contextlib.contextmanager
def serving(server: InferenceServer) -> Iterator[BackgroundServer]:
    with BackgroundServer(server) as bg:
        yield bg


__all__ = [
    "BackgroundServer",
    "GenerateRequest",
    "ScoreRequest",
    "check_loopback",
    "create_app",
    "run",
    "serving",
]
