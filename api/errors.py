"""One error type with stable codes, rendered by one set of handlers as {"error": {code, message, fields}}.

Bad input never becomes a 500 or a traceback: request validation, unknown routes and
unexpected exceptions are all rendered in the same shape.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.db import UNAVAILABLE

log = logging.getLogger(__name__)

# Stable codes and their HTTP status; clients switch on the code, never on the message.
CODES: dict[str, int] = {
    "invalid_request": 422,
    "path_not_allowed": 422,
    "unauthorized": 401,
    "not_found": 404,
    "method_not_allowed": 405,
    "invalid_state": 409,
    "idempotency_conflict": 409,
    "not_ready": 503,
    "payload_too_large": 413,
    "rate_limited": 429,
    "overloaded": 503,
    "generation_timeout": 503,
    "database_unavailable": 503,
    "internal_error": 500,
}


class APIError(Exception):
    def __init__(
        self,
        code: str,
        message: str,
        status: int | None = None,
        *,
        fields: Sequence[str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status or CODES.get(code, 400)
        self.fields = list(fields) if fields else None
        self.headers = headers

    def response(self) -> JSONResponse:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.fields:
            body["fields"] = self.fields
        return JSONResponse({"error": body}, status_code=self.status, headers=self.headers)


def not_found(what: str = "job") -> APIError:
    return APIError("not_found", f"{what} not found")


def _field(loc: Sequence[Any]) -> str:
    # ("body", "spec", "train", "max_steps") -> "spec.train.max_steps"; ("query", "limit") -> "limit"
    parts = [str(p) for p in loc[1:] if not isinstance(p, int)] if len(loc) > 1 else []
    return ".".join(parts) or str(loc[0] if loc else "body")


def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    fields, lines = [], []
    for err in exc.errors():
        field = _field(err.get("loc", ()))
        fields.append(field)
        lines.append(f"{field}: {str(err.get('msg', 'invalid')).removeprefix('Value error, ')}")
    return APIError("invalid_request", "; ".join(lines), fields=fields).response()


def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized", 413: "payload_too_large"}.get(
        exc.status_code, "http_error")
    return APIError(code, str(exc.detail), exc.status_code, headers=getattr(exc, "headers", None)).response()


def _api_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response()


def database_unavailable(retry_after: int) -> APIError:
    # No error text: it would name hosts, users or file paths.
    return APIError("database_unavailable", "the database is busy or unavailable; try again later",
                    headers={"Retry-After": str(retry_after)})


def _database_error(request: Request, exc: Exception) -> JSONResponse:
    # A database outage or a lock held too long is the service's state, not a bug: 503, so clients retry.
    log.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc)
    settings = getattr(request.app.state, "settings", None)
    return database_unavailable(getattr(settings, "db_retry_after_seconds", 5)).response()


def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return APIError("internal_error", "internal server error").response()


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for exc_type in UNAVAILABLE:
        app.add_exception_handler(exc_type, _database_error)
    app.add_exception_handler(Exception, _unexpected)
