"""The API's errors, in OpenAI's shape {"error": {"message", "type", "param", "code"}}: the ApiError
routes raise, the one mapping of the library's typed errors onto HTTP statuses, and the
application's exception handlers. No message names a path on the server.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.generators import GeneratorError
from app.library import UploadTooLargeError
from retrieval.errors import EmbeddingMismatchError, LockedError, MoeragError, NotFoundError, StoreError

log = logging.getLogger(__name__)


class ApiError(Exception):
    """A refusal a route decides itself: its HTTP status and the error body's fields."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param


def error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def moerag_error(exc: MoeragError) -> ApiError:
    """The library's typed errors, mapped onto HTTP statuses in this one place."""
    if isinstance(exc, NotFoundError):
        return ApiError(404, str(exc), code="not_found")
    if isinstance(exc, LockedError):  # its own message names the data directory: not for API clients
        return ApiError(409, "Another writer (an ingest, upload, delete or rebuild) is changing the knowledge base. "
                        "Try again when it has finished; searches keep working meanwhile.", type="conflict_error", code="locked")
    if isinstance(exc, EmbeddingMismatchError):
        return ApiError(409, str(exc), type="conflict_error", code="embedding_mismatch")
    if isinstance(exc, StoreError):  # names the database URL or index files: logged, not sent
        log.error("knowledge base store error: %s", exc)
        return ApiError(503, "The knowledge base's store failed; the server's log has the details.", type="server_error",
                        code="store_error")
    if isinstance(exc, UploadTooLargeError):
        return ApiError(413, str(exc), code="file_too_large", param="files")
    if isinstance(exc, GeneratorError):
        return ApiError(502, str(exc), type="server_error", code="generator_unavailable")
    return ApiError(400, str(exc))


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# The error statuses every key-checked route documents (its `responses=`).
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {400: "Bad request", 401: "Missing or invalid API key", 403: "The key may not do this",
                       404: "Not found", 409: "Conflict", 413: "The request body (or an uploaded file) is too large",
                       429: "Too many requests for this key (see the Retry-After header)", 502: "The generator failed",
                       503: "The knowledge base's store failed"}.items()
}


# --- the application's exception handlers --------------------------------------------------------


async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.type, exc.code, exc.param), status_code=exc.status)


async def library_error(_request: Request, exc: MoeragError) -> JSONResponse:
    e = moerag_error(exc)
    return JSONResponse(error_body(e.message, e.type, e.code, e.param), status_code=e.status)


async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    """pydantic's first complaint, as a 400 naming the field (`messages.0.role`)."""
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
    message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
    return JSONResponse(error_body(message, "invalid_request_error", "invalid_request", where or None), status_code=400)


async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "not_found" if exc.status_code == 404 else "invalid_request"
    return JSONResponse(error_body(str(exc.detail), "invalid_request_error", kind), status_code=exc.status_code)


async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error")
    return JSONResponse(error_body(f"Internal error: {exc.__class__.__name__}", "server_error", "internal_error"),
                        status_code=500)


HANDLERS = {
    ApiError: api_error,
    MoeragError: library_error,
    RequestValidationError: validation_error,
    StarletteHTTPException: http_error,
    Exception: unexpected,
}
