"""Every failure's answer, written once: exception → HTTP status, error code, message and ``Retry-After``.

The body is always ``{"error": {"code", "message", "details", "request_id"}}`` (``ErrorResponse``). Routes
raise; the handlers installed here answer. What a route can return is declared next to it with
``documented(...)``; what each status means is the ``FAULTS`` table and ``ApiError``:

- 401 ``unauthorized``, 404 ``not_found``, 503 ``model_unavailable``, 504 ``deadline_exceeded``: ``ApiError``
- 413 ``payload_too_large``, 503 ``overloaded`` (shed): written by ``service.middleware``
- 422 ``validation_error``: invalid body, query or path (and a body that is not UTF-8)
- 503 ``store_unavailable`` / ``overloaded`` / ``shutting_down``, 500 ``model_error``: ``FAULTS``
- 500 ``internal``: anything else, answered by the middleware with the request id, traceback logged
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.batcher import BatcherClosed, QueueFull
from service.logs import ThrottledLog
from service.ranking import ModelOutputError
from service.redis_conn import StoreUnavailable
from service.schemas.ops import ErrorBody, ErrorDetail, ErrorResponse
from service.schemas.ranking import CANDIDATE_TAGS

log = logging.getLogger("clickrank.api")
fault_log = ThrottledLog(log)

RETRY_AFTER_S = 1


class ApiError(Exception):
    """An expected failure with its HTTP status and stable error code."""

    def __init__(
        self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


@dataclass(frozen=True, slots=True)
class Fault:
    """How the API answers one kind of exception raised below it."""

    status: int
    code: str
    message: Callable[[Exception], str]
    retry_after_s: Callable[[Exception], int] | None = None
    log_as: str | None = None
    """The log line's summary (one line per route every few seconds); ``None``: not logged."""
    level: int = logging.WARNING


FAULTS: dict[type[Exception], Fault] = {
    StoreUnavailable: Fault(  # the address stays in the log, out of the answer
        503,
        "store_unavailable",
        lambda _: "the history store (Redis) is unavailable; retry later",
        lambda _: RETRY_AFTER_S,
        log_as="store unavailable",
    ),
    QueueFull: Fault(
        503,
        "overloaded",
        lambda _: "the inference queue is full; retry later",
        lambda exc: max(1, math.ceil(exc.retry_after_s)),  # type: ignore[attr-defined]
        log_as="inference queue full",
    ),
    BatcherClosed: Fault(
        503, "shutting_down", lambda _: "the service is shutting down", lambda _: RETRY_AFTER_S
    ),
    ModelOutputError: Fault(500, "model_error", str, log_as="model output", level=logging.ERROR),
}

HTTP_CODES = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def error_response(
    status: int,
    code: str,
    message: str,
    request_id: str | None,
    *,
    details: Sequence[ErrorDetail] = (),
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = ErrorResponse(
        error=ErrorBody(code=code, message=message, details=list(details), request_id=request_id)
    )
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers)


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a route: these statuses answer with an ``ErrorResponse``."""
    return {status: {"model": ErrorResponse} for status in statuses}


def request_id_of(request: Request) -> str | None:
    return request.scope.get("state", {}).get("request_id")


def route_of(request: Request) -> str:
    """``POST /v1/users/{user_id}/history``: the route template, never the raw path (it holds user ids)."""
    return f"{request.method} {getattr(request.scope.get('route'), 'path', 'unmatched')}"


def field_path(loc: Sequence[str | int]) -> str:
    """``("body", "events", 3, "type")`` → ``events[3].type`` (union tags of candidates dropped)."""
    parts: list[str] = []
    for i, part in enumerate(loc):
        if i == 0 and part in ("body", "query", "path", "header"):
            continue
        if isinstance(part, int):
            parts.append(f"[{part}]")
        elif part in CANDIDATE_TAGS and i > 1 and loc[i - 2] == "candidates":
            continue
        else:
            parts.append(f".{part}" if parts else str(part))
    return "".join(parts) or "body"


def validation_details(exc: RequestValidationError) -> list[ErrorDetail]:
    details = []
    for err in exc.errors():
        message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        if err.get("type") == "model_type" and err["loc"] and err["loc"][-1] == "object":
            message = "expected an item id (string) or an object {item_id, text}"
        details.append(ErrorDetail(field=field_path(err["loc"]), message=message, type=err.get("type")))
    return details


async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    details = validation_details(exc)
    message = "; ".join(f"{d.field}: {d.message}" for d in details[:3])
    if len(details) > 3:
        message += f" (and {len(details) - 3} more)"
    return error_response(422, "validation_error", message, request_id_of(request), details=details)


async def on_api_error(request: Request, exc: ApiError) -> JSONResponse:
    if exc.status >= 500:
        route = route_of(request)
        fault_log.log(
            logging.WARNING, f"{route} {exc.code}", "%s → %d %s: %s", route, exc.status, exc.code, exc.message
        )
    return error_response(exc.status, exc.code, exc.message, request_id_of(request), headers=exc.headers)


async def on_fault(request: Request, exc: Exception) -> JSONResponse:
    fault = next(f for kind, f in FAULTS.items() if isinstance(exc, kind))
    if fault.log_as is not None:
        route = route_of(request)
        fault_log.log(
            fault.level,
            f"{route} {fault.code}",
            "%s → %d %s: %s",
            route,
            fault.status,
            fault.log_as,
            exc,
        )
    retry = fault.retry_after_s
    headers = None if retry is None else {"Retry-After": str(retry(exc))}
    return error_response(
        fault.status, fault.code, fault.message(exc), request_id_of(request), headers=headers
    )


async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # FastAPI answers 400 when it cannot decode the body (not UTF-8): invalid input, like bad JSON
    if exc.status_code == 400:
        message = "the body is not valid JSON (UTF-8)"
        details = [ErrorDetail(field="body", message=message, type="json_invalid")]
        return error_response(422, "validation_error", message, request_id_of(request), details=details)
    code = HTTP_CODES.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail), request_id_of(request), headers=exc.headers)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, on_validation)  # type: ignore[arg-type]
    app.add_exception_handler(ApiError, on_api_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, on_http_error)  # type: ignore[arg-type]
    for kind in FAULTS:
        app.add_exception_handler(kind, on_fault)
