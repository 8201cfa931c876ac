"""One place that maps exceptions to gRPC status codes (docs/serving.md#errors), plus bearer-token auth.

Handlers raise `APIError`; this interceptor turns it into the matching status with the same
human-readable message as HTTP. Only `longserve.v1.Generation` is guarded: health and reflection
must keep answering probes without credentials.
"""
from __future__ import annotations

import hmac
import logging

import grpc

from longserve.server.api.errors import APIError, BadRequest, EngineFailure

log = logging.getLogger("longserve.server.api")
SERVICE_PREFIX = "/longserve.v1.Generation/"


async def _abort(context: grpc.aio.ServicerContext, exc: Exception):
    """Abort the call with the status for `exc`; a stray ValueError is the client's fault."""
    if isinstance(exc, ValueError) and not isinstance(exc, APIError):
        exc = BadRequest(str(exc))
    elif not isinstance(exc, APIError):
        log.error("unhandled error in a gRPC call", exc_info=exc)
        exc = EngineFailure(f"Internal error: {type(exc).__name__}: {exc}")
    await context.abort(getattr(grpc.StatusCode, exc.grpc_code), exc.message)


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, api_key: str | None = None):
        self._api_key = api_key.encode() if api_key is not None else None

    def _authorized(self, context: grpc.aio.ServicerContext) -> bool:
        if self._api_key is None:
            return True
        metadata = dict(context.invocation_metadata() or ())
        given = metadata.get("authorization", "")
        token = given[7:] if given[:7].lower() == "bearer " else ""
        return hmac.compare_digest(token.encode(), self._api_key)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(SERVICE_PREFIX):
            return handler
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary), request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream), request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler

    def _wrap_unary(self, behavior):
        async def wrapper(request, context):
            if not self._authorized(context):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "Incorrect or missing API key.")
            try:
                return await behavior(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _abort(context, exc)
        return wrapper

    def _wrap_stream(self, behavior):
        async def wrapper(request, context):
            if not self._authorized(context):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "Incorrect or missing API key.")
            try:
                async for response in behavior(request, context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _abort(context, exc)
        return wrapper

