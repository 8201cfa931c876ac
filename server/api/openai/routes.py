"""FastAPI routes: thin glue from HTTP to `OpenAIServing` (docs/serving.md#routes).

Bodies are read here with the 64 MiB cap (413) and parsed by hand, so malformed JSON, schema
errors and engine rejections all leave as the same error envelope; nothing but a genuine bug
can produce a 500, and that too is an envelope.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from longserve.server.api.errors import APIError, BadRequest, EngineFailure, PayloadTooLarge, Unauthorized
from longserve.server.api.lifecycle import ServerState
from longserve.server.api.metrics import Metrics
from longserve.server.api.openai.protocol import parse_request
from longserve.server.api.openai.serving import OpenAIServing

log = logging.getLogger("longserve.server.api")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")


def _error(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.envelope(), status_code=exc.status)


async def read_json(request: Request, limit: int):
    """The request body as JSON, refusing more than `limit` bytes (413) and malformed JSON (400)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"malformed JSON body: {exc}") from None


async def _unless_disconnected(request: Request, work):
    """Run `work` but cancel it (aborting the engine request) if the client goes away first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        log.info("client disconnected; request aborted", extra={"event": "client_disconnect"})
        return Response(status_code=499)
    return task.result()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class BearerAuth:
    """Pure ASGI middleware (no response buffering, so streaming and disconnects stay intact)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.api_key = api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith(_PROTECTED_PREFIXES):
            headers = dict(scope.get("headers") or ())
            given = headers.get(b"authorization", b"")
            token = given[7:] if given[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, self.api_key):
                await _error(Unauthorized("Incorrect or missing API key."))(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_http_app(state: ServerState, serving: OpenAIServing, metrics: Metrics, *,
                   api_key: str | None = None, max_body_bytes: int = 64 * 2**20,
                   version: str = "unknown") -> FastAPI:
    app = FastAPI(title="LongServe", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError):
        return _error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        cls = {404: "NotFoundError", 405: "BadRequestError"}.get(exc.status_code, "BadRequestError")
        body = {"error": {"message": str(exc.detail), "type": cls, "param": None, "code": exc.status_code}}
        return JSONResponse(body, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception):
        log.exception("unhandled error in a request")
        return _error(EngineFailure(f"Internal error: {type(exc).__name__}: {exc}"))

    if api_key is not None:
        app.add_middleware(BearerAuth, api_key=api_key)

    @app.get("/health")
    async def health():
        return Response(status_code=200 if state.is_ready() else 503)

    @app.get("/version")
    async def version_route():
        return {"version": version}

    @app.get("/metrics")
    async def metrics_route():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return serving.models()

    @app.get("/v1/models/{model_id:path}")      # ids may hold slashes (org/name)
    async def model(model_id: str):
        return serving.model(model_id)

    async def generate(request: Request, kind: str):
        arrival = time.monotonic()
        try:
            state.require_engine()
            req = parse_request(kind, await read_json(request, max_body_bytes))
            work = serving.chat(req, arrival) if kind == "chat" else serving.completions(req, arrival)
            result = await _unless_disconnected(request, work)
        except APIError as exc:
            serving.core.count_rejection(exc)
            raise
        if isinstance(result, Response):
            return result
        if req.stream:
            return StreamingResponse(result, media_type="text/event-stream", headers=SSE_HEADERS,
                                     background=BackgroundTask(result.aclose))
        return JSONResponse(result)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await generate(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, "completion")

    @app.post("/tokenize")
    async def tokenize(request: Request):
        return await serving.tokenize(parse_request("tokenize", await read_json(request, max_body_bytes)))

    @app.post("/detokenize")
    async def detokenize(request: Request):
        return await serving.detokenize(parse_request("detokenize", await read_json(request, max_body_bytes)))

    return app
