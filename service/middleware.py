"""The ASGI middleware around every request: request context (id, body limit, metrics, access line, the
last-resort 500) and admission control (shedding model requests past capacity)."""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Literal, get_args

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import RETRY_AFTER_S, error_response, fault_log
from service.logs import REQUEST_ID
from service.loop_lag import LoopLagMonitor
from service.metrics import (
    QUEUE_REJECTED,
    REQUEST_LATENCY,
    REQUESTS,
    SHED,
    SHED_LATENCY,
    counted_from_start,
    labelled,
)
from service.ranking import PREDICT_ROUTE, RECOMMEND_ROUTE
from service.schemas.fields import ID_PATTERN

log = logging.getLogger("clickrank.api")
access_log = logging.getLogger("clickrank.access")
_REQUEST_ID = re.compile(ID_PATTERN)

_QUIET_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})
"""Probed every few seconds: their access lines are DEBUG unless they fail."""


SHED_STATE = "shed"
"""Scope-state key that ``AdmissionControl`` sets on a request it sheds, so the outer middleware times it in
``clickrank_shed_seconds`` too."""


class RequestContextMiddleware:
    """Request id (``X-Request-ID`` echoed or generated, and set in ``service.logs.REQUEST_ID`` so every
    log line of the request carries it), body size limit, metrics and one access-log line by route
    template, and the last line of defence: an unexpected exception becomes a JSON 500, never a traceback.

    The access line holds method, route template, status and latency: never the raw URL (its query
    string), a header or a body."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        context_token = REQUEST_ID.set(request_id)
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status, response_started = message["status"], True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:  # a chunked body without Content-Length
                raise StarletteHTTPException(413, self._too_large)
            return message

        try:
            if _content_length(headers) > self.max_body_bytes:
                await error_response(413, "payload_too_large", self._too_large, request_id)(
                    scope, receive, send_with_id
                )
            else:
                await self.app(scope, limited_receive, send_with_id)
        except Exception:
            route = getattr(scope.get("route"), "path", "unmatched")  # the raw path may hold a user id
            log.exception("unhandled error in %s %s (request %s)", scope["method"], route, request_id)
            if not response_started:
                await error_response(500, "internal", "internal error", request_id)(
                    scope, receive, send_with_id
                )
        finally:
            elapsed = time.perf_counter() - started
            template = getattr(scope.get("route"), "path", "unmatched")
            labelled(REQUESTS, template, scope["method"], str(status)).inc()
            labelled(REQUEST_LATENCY, template).observe(elapsed)
            if scope["state"].get(SHED_STATE):
                labelled(SHED_LATENCY, template).observe(elapsed)
            _log_access(scope["method"], template, status, elapsed)
            REQUEST_ID.reset(context_token)

    @property
    def _too_large(self) -> str:
        return f"request body larger than {self.max_body_bytes} bytes"


MODEL_ROUTES = frozenset({PREDICT_ROUTE, RECOMMEND_ROUTE})
"""The routes that queue for the ranker: admitted up to the batcher's capacity, shed beyond it."""
ShedReason = Literal["in_flight", "loop_lag"]
SHED_REASONS: tuple[ShedReason, ...] = get_args(ShedReason)
"""Why a request was shed: ``clickrank_shed_total`` counts each from start-up."""
counted_from_start(SHED, SHED_REASONS)


@dataclass(frozen=True, slots=True)
class _RouteTemplate:
    """Stands in for the route the router would have matched, for a request answered before routing."""

    path: str


class AdmissionControl:
    """Sheds model requests past capacity before doing any work for them.

    The batcher's bounded queue refuses work only once a request has been parsed, validated and has read
    Redis; under a burst far past capacity that work alone saturates the event loop, and every answer,
    refusals included, waits behind it. Two limits, checked before the body is read:

    - ``max_in_flight`` model requests (``CLICKRANK_MAX_IN_FLIGHT``, never more than a full queue plus one
      batch: ``service.app`` passes the smaller);
    - the event loop's lag (``service.loop_lag``) above ``max_loop_lag_s``: the process is saturated, so
      a new request would only make every admitted one later (0 turns this limit off).

    Past either, the answer is 503 ``overloaded`` with ``Retry-After`` at once. Admitted requests keep
    their full answer: being slow is the process's own load, never a reason to answer ``degraded``.
    """

    def __init__(
        self, app: ASGIApp, *, max_in_flight: int, loop_lag: LoopLagMonitor, max_loop_lag_s: float
    ) -> None:
        self.app = app
        self.max_in_flight = max_in_flight
        self.loop_lag = loop_lag
        self.max_loop_lag_s = max_loop_lag_s
        self.in_flight = 0

    def _refusal(self) -> tuple[ShedReason, str] | None:
        """(reason, message) when a new model request must be shed, else None."""
        if self.in_flight >= self.max_in_flight:
            return "in_flight", f"the service is at capacity ({self.max_in_flight} requests in flight)"
        lag = self.loop_lag.lag_s
        if self.max_loop_lag_s > 0 and lag > self.max_loop_lag_s:
            return "loop_lag", f"the service is saturated (event loop {lag * 1000:.0f} ms late)"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path")
        if scope["type"] != "http" or scope["method"] != "POST" or path not in MODEL_ROUTES:
            await self.app(scope, receive, send)
            return
        refusal = self._refusal()
        if refusal is not None:
            reason, message = refusal
            QUEUE_REJECTED.inc()
            SHED.labels(reason).inc()
            fault_log.log(
                logging.WARNING, f"{path} shed", "POST %s → 503 shed (%s): %d in flight", path, reason,
                self.in_flight,
            )  # fmt: skip
            scope["route"] = _RouteTemplate(path)  # the access line and the metrics name the route
            scope.setdefault("state", {})[SHED_STATE] = reason
            request_id = scope.get("state", {}).get("request_id")
            headers = {"Retry-After": str(RETRY_AFTER_S)}
            await error_response(503, "overloaded", f"{message}; retry later", request_id, headers=headers)(
                scope, receive, send
            )
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


def _log_access(method: str, route: str, status: int, elapsed_s: float) -> None:
    level = logging.DEBUG if route in _QUIET_ROUTES and status < 400 else logging.INFO
    if access_log.isEnabledFor(level):
        latency_ms = round(elapsed_s * 1000, 2)
        access_log.log(
            level,
            "%s %s %d %.2f ms",
            method,
            route,
            status,
            latency_ms,
            extra={"method": method, "route": route, "status": status, "latency_ms": latency_ms},
        )


def _content_length(headers: dict[bytes, bytes]) -> int:
    try:
        return int(headers.get(b"content-length", b"0"))
    except ValueError:
        return 0
