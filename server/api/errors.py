"""API errors as values: one class per row of the table in docs/serving.md#errors, shared by HTTP and gRPC.

Request handling raises `APIError`; the HTTP layer renders `envelope()` with `status`, the gRPC
interceptor maps `grpc_code` (a `grpc.StatusCode` name, so this module stays import-light).
"""
from __future__ import annotations


class APIError(Exception):
    status = 500
    err_type = "InternalServerError"
    grpc_code = "INTERNAL"
    counted = False        # already recorded as a request outcome (metrics)

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param

    def envelope(self) -> dict:
        """The nested OpenAI error body (what the SDKs parse as `error.message`)."""
        return {"error": {"message": self.message, "type": self.err_type,
                          "param": self.param, "code": self.status}}


class BadRequest(APIError):
    status, err_type, grpc_code = 400, "BadRequestError", "INVALID_ARGUMENT"


class Unauthorized(APIError):
    status, err_type, grpc_code = 401, "AuthenticationError", "UNAUTHENTICATED"


class NotFound(APIError):
    status, err_type, grpc_code = 404, "NotFoundError", "NOT_FOUND"


class PayloadTooLarge(APIError):
    status, err_type, grpc_code = 413, "BadRequestError", "RESOURCE_EXHAUSTED"


class Overloaded(APIError):
    status, err_type, grpc_code = 429, "RateLimitError", "RESOURCE_EXHAUSTED"


class EngineFailure(APIError):
    status, err_type, grpc_code = 500, "InternalServerError", "INTERNAL"


class Unavailable(APIError):
    status, err_type, grpc_code = 503, "ServiceUnavailableError", "UNAVAILABLE"


class EngineOutOfMemory(APIError):
    """The engine ran out of memory running this request; the server itself keeps serving."""
    status, err_type, grpc_code = 503, "ServiceUnavailableError", "RESOURCE_EXHAUSTED"


def model_not_found(name: str) -> NotFound:
    return NotFound(f"The model `{name}` does not exist.", param="model")
