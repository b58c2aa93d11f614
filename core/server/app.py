"""The FastAPI app: routes, the API key, errors in OpenAI's shape, disconnects and draining.

Every generation route reads and checks its whole body before anything reaches the engine;
a client that disconnects, streaming or not, cancels its handler, which aborts its requests.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import secrets
from contextlib import asynccontextmanager

import uvicorn

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from loom import __version__
from loom.async_engine import AsyncEngine, EngineDeadError
from loom.server.metrics import Metrics
from loom.server.protocol import (APIError, ChatRequest, CompletionRequest, DetokenizeRequest,
                                  TokenizeRequest, parse_json, parse_model)
from loom.server.serving import OpenAIServing, ServerSettings, engine_failed

logger = logging.getLogger("loom")


def build_app(engine: AsyncEngine, settings: ServerSettings) -> FastAPI:
    """The app around an AsyncEngine; its lifespan starts serving and shuts the engine down."""
    serving = OpenAIServing(engine, settings)
    metrics = Metrics(settings.model_names[0], speculative=engine.info.speculative)
    engine.on_step = metrics.on_step

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not engine.started:
            engine.start()
        freeze_heap()
        try:
            yield
        finally:
            gc.unfreeze()
        await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="loom", version=__version__, lifespan=lifespan)
    app.state.engine, app.state.serving, app.state.metrics = engine, serving, metrics
    app.state.draining = False           # set on SIGTERM: new requests get 503
    add_error_handlers(app)

    def accepting() -> None:
        if app.state.draining:
            raise APIError(503, "the server is shutting down", type="service_unavailable")

    async def body(request: Request, cls):
        accepting()
        return parse_model(cls, parse_json(await request.body()))

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(api_key_check(settings.api_key))])

    @v1.post("/completions")
    async def completions(request: Request):
        req = await body(request, CompletionRequest)
        return await respond(request, serving.completions(req))

    @v1.post("/chat/completions")
    async def chat(request: Request):
        req = await body(request, ChatRequest)
        return await respond(request, serving.chat(req))

    @v1.get("/models")
    async def models():
        return serving.models()

    app.include_router(v1)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        return serving.tokenize(await body(request, TokenizeRequest))

    @app.post("/detokenize")
    async def detokenize(request: Request):
        return serving.detokenize(await body(request, DetokenizeRequest))

    @app.get("/health")
    async def health():
        if not engine.healthy:
            return error(APIError(503, "the engine has failed", type="service_unavailable"))
        if app.state.draining:
            return error(APIError(503, "the server is shutting down", type="service_unavailable"))
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/version")
    async def version():
        return {"version": __version__, "platform": engine.info.platform}

    return app


def freeze_heap() -> None:
    """Put what start-up left alive (torch, the tokenizer, the app) out of the garbage
    collector's reach. A full collection then scans only what serving allocates: pauses of
    the event loop fall from hundreds of milliseconds to tens (benchmarks/server_frontend.py)."""
    gc.collect()
    gc.freeze()


def api_key_check(key: str | None):
    expected = f"Bearer {key}".encode()

    async def check(request: Request) -> None:
        if key is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not secrets.compare_digest(given, expected):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer "
                                "<key>'", type="invalid_request_error", code="invalid_api_key")
    return check


async def respond(request: Request, work) -> Response:
    """A dict as JSON, an async iterator as server-sent events; the work is cancelled (and its
    requests aborted) if the client disconnects first."""
    result = await until_disconnected(request, work)
    if isinstance(result, dict):
        return JSONResponse(result)
    return StreamingResponse(result, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def until_disconnected(request: Request, work):
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task in done:
        return task.result()
    return {}          # the client is gone; nobody reads this


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def error(e: APIError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return error(e)

    @app.exception_handler(EngineDeadError)
    async def engine_dead(request: Request, e: EngineDeadError):
        return error(engine_failed(e))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error(APIError(e.status_code, str(e.detail), type=kind), e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        return error(APIError(400, "invalid request"))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        logger.exception("loom: internal error on %s", request.url.path)
        return error(APIError(500, f"internal error: {type(e).__name__}", type="server_error"))


class DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the app it drains as soon as SIGTERM or SIGINT arrives; uvicorn
    then closes the listening socket and waits up to timeout_graceful_shutdown."""

    def handle_exit(self, sig, frame) -> None:
        self.config.app.state.draining = True
        super().handle_exit(sig, frame)
