"""The FastAPI application: routes, the API key check, and OpenAI's error shape for every failure.

Routes: POST /v1/completions, POST /v1/chat/completions, POST /infill (llama.cpp), GET /v1/models (and
/v1/models/NAME), GET /metrics (Prometheus), GET or HEAD /health. With an `api_key`, every route but /health needs
`Authorization: Bearer <key>` (401). Errors: 400 bad parameters or prompt (the field named in
`error.param`), 401, 404 unknown route or model, 413 body over `max_body_bytes`, 429 queue full,
500 anything unexpected (logged; the server goes on serving). A client that goes away cancels its
requests, streamed or not.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import time

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from ..engine.async_engine import AsyncEngine
from . import chat, completions, infill, metrics
from .protocol import DEFAULT_MAX_BODY, APIError, check_model, error_body, read_json

log = logging.getLogger("codellama_rt.server")


class Server:
    """What the handlers share: the model, its AsyncEngine, the served name and the body limit."""

    def __init__(self, model, name: str, max_body: int):
        self.model, self.name, self.max_body = model, name, max_body
        self.aengine = AsyncEngine(model.engine)
        self.registry = metrics.registry(model.engine.metrics)
        self.created = int(time.time())


def create_app(model, *, served_model_name: str, api_key=None, max_body_bytes: int = DEFAULT_MAX_BODY) -> FastAPI:
    """The app serving `model` (a loaded codellama_rt Model) under `served_model_name`."""
    server = Server(model, served_model_name, max_body_bytes)
    app = FastAPI(title="codellama-rt", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                           code="invalid_api_key")

    guarded = [Depends(authorize)]

    def post(path: str, handler) -> None:
        async def route(request: Request):
            try:
                body = await read_json(request, server.max_body)
                result = await _unless_disconnected(request, handler(body, server))
            except ClientDisconnect:  # (gone while sending its body: nobody to answer)
                log.info("client went away: %s %s while sending its body", request.method, request.url.path)
                return Response(status_code=499)
            except APIError:
                raise
            except Exception as e:  # answered here: re-raised past the app, uvicorn would drop the connection
                return _internal_error(request, e)
            return JSONResponse(result) if isinstance(result, dict) else result

        app.add_api_route(path, route, methods=["POST"], dependencies=guarded)

    post("/v1/completions", completions.create)
    post("/v1/chat/completions", chat.create)
    post("/infill", infill.create)

    def model_object() -> dict:
        return {"id": server.name, "object": "model", "created": server.created, "owned_by": "codellama-rt",
                "max_model_len": model.max_seq_len}

    @app.get("/v1/models", dependencies=guarded)
    async def models():
        return {"object": "list", "data": [model_object()]}

    @app.get("/v1/models/{name:path}", dependencies=guarded)
    async def one_model(name: str):
        check_model({"model": name}, server.name)
        return model_object()

    @app.get("/metrics", dependencies=guarded)
    async def prometheus():
        return Response(metrics.render(server.registry), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        return {"status": "ok"}

    _add_error_handlers(app)
    return app


async def _unless_disconnected(request: Request, work):
    """Await `work` (a handler: it submits, then waits for completions or returns a streaming response);
    if the client goes away first, cancel it, which cancels its requests, and answer nobody (499).
    A streamed response watches for the disconnect itself (Starlette cancels its body)."""
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    gone = False
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            gone = True
            task.cancel()
            log.info("client went away: %s %s cancelled", request.method, request.url.path)
            # (a cancelled task is done only once it has run again: until then its result() raises)
            await asyncio.gather(task, return_exceptions=True)
    if gone:
        return Response(status_code=499)
    return task.result()


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        if e.status_code == 404:
            body = error_body(f"not found: {request.method} {request.url.path}", code="not_found")
        elif e.status_code == 405:
            body = error_body(f"method {request.method} not allowed on {request.url.path}", code="method_not_allowed")
        else:
            body = error_body(str(e.detail), "server_error" if e.status_code >= 500 else "invalid_request_error")
        return JSONResponse(body, status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        return _internal_error(request, e)


def _internal_error(request: Request, e: Exception) -> JSONResponse:
    log.error("internal error on %s %s: %s: %s", request.method, request.url.path, type(e).__name__, e,
              exc_info=e)
    return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", "server_error"), status_code=500)
