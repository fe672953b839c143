"""The FastAPI application: routes of the v1 API, error handling, request middleware and lifespan.

Handlers stay thin: request logic lives in ``service.ranking``, storage in ``service.store`` and
``service.catalog``. Every failure has a defined JSON answer (``{"error": {"code", "message", ...}}``):
invalid input 422, a missing model 503 ``model_unavailable``, Redis down 503 ``store_unavailable``,
a full batcher queue 503 ``overloaded`` with ``Retry-After``, a request past its deadline 504
``deadline_exceeded``, anything unexpected 500 ``internal`` with a request id and a logged traceback.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import secrets
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Security
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.batcher import BatcherClosed, MicroBatcher, QueueFull
from service.candidates import CandidateSources
from service.catalog import ItemCatalog
from service.catalog_sync import CatalogSync
from service.logs import REQUEST_ID, ThrottledLog, install_request_id_factory
from service.metrics import EVENTS_INGESTED, ITEMS_UPSERTED, QUEUE_REJECTED, REQUEST_LATENCY, REQUESTS
from service.ranking import ModelOutputError, Ranker
from service.redis_conn import RedisConnection, StoreUnavailable
from service.runtime import ModelLoadError, OnnxModels
from service.schemas import (
    CANDIDATE_TAGS,
    ID_PATTERN,
    BatchingInfo,
    ErrorBody,
    ErrorDetail,
    ErrorResponse,
    EventsRequest,
    EventsResponse,
    ForgetResponse,
    HistoryEvent,
    HistoryResponse,
    ItemOut,
    ItemsRequest,
    ItemsResponse,
    ModelInfo,
    PredictRequest,
    PredictResponse,
    RecommendRequest,
    RecommendResponse,
    Status,
)
from service.settings import Settings
from service.store import HistoryStore, StoredEvent

log = logging.getLogger("clickrank.api")
access_log = logging.getLogger("clickrank.access")
fault_log = ThrottledLog(log)

T = TypeVar("T")
RETRY_AFTER_S = 1
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


class ApiError(Exception):
    """An expected failure with its HTTP status and stable error code."""

    def __init__(
        self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


@dataclass
class Services:
    """Everything the routes use; built by the lifespan, reachable as ``app.state.services``."""

    settings: Settings
    redis: RedisConnection
    store: HistoryStore
    catalog: ItemCatalog | None = None
    catalog_sync: CatalogSync | None = None
    batcher: MicroBatcher | None = None
    ranker: Ranker | None = None
    model_error: str | None = "model not loaded yet"
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def require_ranker(self) -> Ranker:
        if self.ranker is None:
            raise ApiError(503, "model_unavailable", f"the model is not available: {self.model_error}")
        return self.ranker


# -------------------------------------------------------------------------------------------- lifespan


async def _load_model(services: Services) -> None:
    """Load the ONNX graphs and the catalog, start the batcher, warm every shape bucket.

    A failure leaves the app running without a model: ``/readyz`` says why and model routes answer 503.
    """
    settings = services.settings
    try:
        models = await asyncio.to_thread(
            OnnxModels, settings.model_dir, device=settings.device, intra_op_threads=settings.intra_op_threads
        )
        catalog = await asyncio.to_thread(ItemCatalog.from_model_dir, settings.model_dir, models.version)
        await asyncio.to_thread(models.warm_up)
    except Exception as exc:  # ModelLoadError, or a graph ONNX Runtime refuses: report, keep serving
        services.model_error = str(exc) if isinstance(exc, ModelLoadError) else f"{type(exc).__name__}: {exc}"
        log.error("model not loaded from %s: %s", settings.model_dir, services.model_error)
        return
    batcher = MicroBatcher(
        models.rank,
        max_batch_size=settings.max_batch_size,
        max_delay_ms=settings.max_batch_delay_ms,
        max_queue=settings.max_queue,
    )
    await batcher.start()
    services.catalog, services.batcher = catalog, batcher
    services.catalog_sync = CatalogSync(services.redis, catalog, prefix=settings.redis_prefix)
    services.ranker = Ranker(
        models,
        catalog,
        services.store,
        batcher,
        history_length=min(settings.history_length, models.history_length),
        retrieval_size=settings.retrieval_size,
        sources=CandidateSources(
            catalog,
            services.store,
            covisit_sources=settings.covisit_sources,
            covisit_candidates=settings.covisit_candidates,
            fresh_candidates=settings.fresh_candidates,
            trending_candidates=settings.trending_candidates,
        ),
        covisit_weight=settings.covisit_weight,
    )
    services.model_error = None
    log.info("model %s loaded (%d items, providers %s)", models.version, len(catalog), models.providers)
    failing = await _sync_catalog(services, failing=False)
    services.tasks.append(asyncio.create_task(_sync_catalog_forever(services, failing), name="catalog-sync"))


async def _sync_catalog(services: Services, *, failing: bool) -> bool:
    """One sync round; returns whether it failed. A failure is logged when it starts, and the recovery."""
    assert services.catalog_sync is not None
    try:
        applied = await services.catalog_sync.sync()
    except (
        Exception
    ) as exc:  # Redis down or slow, a malformed entry: retried next round, the catalog stays usable
        if not failing:
            log.warning(
                "catalog sync failing, retrying every %gs: %s", services.settings.item_sync_interval_s, exc
            )
        return True
    if failing:
        log.info("catalog sync recovered")
    if applied:
        log.info("catalog sync applied %d items published by other replicas", applied)
    return False


async def _sync_catalog_forever(services: Services, failing: bool) -> None:
    """Pick up items that other replicas (or a previous run) published, every ``item_sync_interval_s``."""
    while True:
        await asyncio.sleep(services.settings.item_sync_interval_s)
        failing = await _sync_catalog(services, failing=failing)


async def _shutdown(services: Services) -> None:
    """Stop taking work, finish queued requests, stop background tasks, close Redis."""
    if services.batcher is not None:
        await services.batcher.stop(drain=True)
    for task in services.tasks:
        task.cancel()
    for task in services.tasks:
        with suppress(asyncio.CancelledError):
            await task
    await services.redis.close()


# ------------------------------------------------------------------------------------------ middleware


_QUIET_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})
"""Probed every few seconds: their access lines are DEBUG unless they fail."""


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
                await _error_response(413, "payload_too_large", self._too_large, request_id)(
                    scope, receive, send_with_id
                )
            else:
                await self.app(scope, limited_receive, send_with_id)
        except Exception:
            log.exception("unhandled error in %s %s (request %s)", scope["method"], scope["path"], request_id)
            if not response_started:
                await _error_response(500, "internal", "internal error", request_id)(
                    scope, receive, send_with_id
                )
        finally:
            elapsed = time.perf_counter() - started
            template = getattr(scope.get("route"), "path", "unmatched")
            REQUESTS.labels(route=template, method=scope["method"], status=str(status)).inc()
            REQUEST_LATENCY.labels(route=template).observe(elapsed)
            _log_access(scope["method"], template, status, elapsed)
            REQUEST_ID.reset(context_token)

    @property
    def _too_large(self) -> str:
        return f"request body larger than {self.max_body_bytes} bytes"


MODEL_ROUTES = frozenset({"/v1/predict", "/v1/recommend"})
"""The routes that queue for the ranker: admitted up to the batcher's capacity, shed beyond it."""


@dataclass(frozen=True, slots=True)
class _RouteTemplate:
    """Stands in for the route the router would have matched, for a request answered before routing."""

    path: str


class AdmissionControl:
    """Sheds model requests past capacity before doing any work for them.

    The batcher's bounded queue refuses work only once a request has been parsed, validated and has read
    Redis; under a burst far past capacity that work alone saturates the event loop, and every answer,
    refusals included, waits behind it. Counting requests in flight here bounds that work: at most
    ``max_in_flight`` model requests (a full queue plus one batch) are admitted, the others get the same
    503 ``overloaded`` with ``Retry-After`` at once, without their body being read.
    """

    def __init__(self, app: ASGIApp, *, max_in_flight: int) -> None:
        self.app = app
        self.max_in_flight = max_in_flight
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path")
        if scope["type"] != "http" or scope["method"] != "POST" or path not in MODEL_ROUTES:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_in_flight:
            QUEUE_REJECTED.inc()
            fault_log.log(
                logging.WARNING, f"{path} shed", "POST %s → 503 shed: %d in flight", path, self.in_flight
            )
            scope["route"] = _RouteTemplate(path)  # the access line and the metrics name the route
            message = f"the service is at capacity ({self.max_in_flight} requests in flight); retry later"
            request_id = scope.get("state", {}).get("request_id")
            headers = {"Retry-After": str(RETRY_AFTER_S)}
            await _error_response(503, "overloaded", message, request_id, headers=headers)(
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


# -------------------------------------------------------------------------------------- error handling


def _error_response(
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


def _request_id(request: Request) -> str | None:
    return request.scope.get("state", {}).get("request_id")


def _route(request: Request) -> str:
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


def _validation_details(exc: RequestValidationError) -> list[ErrorDetail]:
    details = []
    for err in exc.errors():
        message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        if err.get("type") == "model_type" and err["loc"] and err["loc"][-1] == "object":
            message = "expected an item id (string) or an object {item_id, text}"
        details.append(ErrorDetail(field=field_path(err["loc"]), message=message, type=err.get("type")))
    return details


_HTTP_CODES = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def install_error_handlers(app: FastAPI) -> None:
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = _validation_details(exc)
        message = "; ".join(f"{d.field}: {d.message}" for d in details[:3])
        if len(details) > 3:
            message += f" (and {len(details) - 3} more)"
        return _error_response(422, "validation_error", message, _request_id(request), details=details)

    async def on_api_error(request: Request, exc: ApiError) -> JSONResponse:
        if exc.status >= 500:
            route = _route(request)
            fault_log.log(
                logging.WARNING,
                f"{route} {exc.code}",
                "%s → %d %s: %s",
                route,
                exc.status,
                exc.code,
                exc.message,
            )
        return _error_response(exc.status, exc.code, exc.message, _request_id(request), headers=exc.headers)

    async def on_store_unavailable(request: Request, exc: StoreUnavailable) -> JSONResponse:
        route = _route(request)
        fault_log.log(logging.WARNING, f"{route} store", "%s → 503 store unavailable: %s", route, exc)
        message = "the history store (Redis) is unavailable; retry later"  # the address stays in the log
        headers = {"Retry-After": str(RETRY_AFTER_S)}
        return _error_response(503, "store_unavailable", message, _request_id(request), headers=headers)

    async def on_queue_full(request: Request, exc: QueueFull) -> JSONResponse:
        route = _route(request)
        fault_log.log(logging.WARNING, f"{route} queue", "%s → 503 inference queue full", route)
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
        message = "the inference queue is full; retry later"
        return _error_response(503, "overloaded", message, _request_id(request), headers=headers)

    async def on_batcher_closed(request: Request, exc: BatcherClosed) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)}
        message = "the service is shutting down"
        return _error_response(503, "shutting_down", message, _request_id(request), headers=headers)

    async def on_model_output(request: Request, exc: ModelOutputError) -> JSONResponse:
        log.error("%s → 500: %s", _route(request), exc)
        return _error_response(500, "model_error", str(exc), _request_id(request))

    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI answers 400 when it cannot decode the body (not UTF-8): invalid input, like bad JSON
        if exc.status_code == 400:
            message = "the body is not valid JSON (UTF-8)"
            details = [ErrorDetail(field="body", message=message, type="json_invalid")]
            return _error_response(422, "validation_error", message, _request_id(request), details=details)
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return _error_response(
            exc.status_code, code, str(exc.detail), _request_id(request), headers=exc.headers
        )

    app.add_exception_handler(RequestValidationError, on_validation)  # type: ignore[arg-type]
    app.add_exception_handler(ApiError, on_api_error)  # type: ignore[arg-type]
    app.add_exception_handler(StoreUnavailable, on_store_unavailable)  # type: ignore[arg-type]
    app.add_exception_handler(QueueFull, on_queue_full)  # type: ignore[arg-type]
    app.add_exception_handler(BatcherClosed, on_batcher_closed)  # type: ignore[arg-type]
    app.add_exception_handler(ModelOutputError, on_model_output)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, on_http_error)  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------------- routes


# Dependencies are ``async def`` on purpose: FastAPI runs a plain ``def`` dependency in its thread pool,
# a thread hop per dependency per request (5% of a predict's CPU, measured).
async def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]
UserIdPath = Annotated[str, Path(min_length=1, max_length=128, pattern=ID_PATTERN)]
ItemIdPath = Annotated[str, Path(min_length=1, max_length=128, pattern=ID_PATTERN)]
_api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="when CLICKRANK_API_KEYS is set"
)


async def require_api_key(
    services: ServicesDep, key: Annotated[str | None, Security(_api_key_header)]
) -> None:
    accepted = services.settings.api_key_list()
    if accepted and not (key and any(secrets.compare_digest(key, a) for a in accepted)):
        raise ApiError(401, "unauthorized", "missing or invalid X-API-Key header")


def _declared_query(dependant: Dependant) -> set[str]:
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _declared_query(sub)
    return names


async def check_query(request: Request) -> None:
    """Unknown or repeated query parameters are invalid input, like unknown body fields: ``?limt=5`` or
    ``?limit=5&limit=x`` would otherwise be silently ignored or half used."""
    route = request.scope.get("route")
    declared = _declared_query(route.dependant) if isinstance(route, APIRoute) else set()
    counts = Counter(key for key, _ in request.query_params.multi_items())
    errors = [
        {"type": "extra_forbidden", "loc": ("query", key), "msg": "unknown query parameter"}
        for key in counts
        if key not in declared
    ]
    errors += [
        {"type": "repeated", "loc": ("query", key), "msg": "given more than once"}
        for key, n in counts.items()
        if n > 1 and key in declared
    ]
    if errors:
        raise RequestValidationError(errors)


async def within_deadline(services: Services, work: Awaitable[T]) -> T:
    """Run one request's work under ``request_timeout_ms``: a late answer is a 504, never a hang."""
    timeout_ms = services.settings.request_timeout_ms
    try:
        async with asyncio.timeout(timeout_ms / 1000.0):
            return await work
    except TimeoutError:
        raise ApiError(504, "deadline_exceeded", f"the request took longer than {timeout_ms:g} ms") from None


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse} for status in statuses}


v1 = APIRouter(
    prefix="/v1",
    dependencies=[Depends(require_api_key), Depends(check_query)],
    responses=_errors(401, 413, 422, 500),
)


@v1.post("/events", response_model=EventsResponse, responses=_errors(503, 504))
async def post_events(body: EventsRequest, services: ServicesDep) -> EventsResponse:
    """Store behaviour events, all or nothing; acknowledged only once Redis has them. A repeated
    ``event_id`` is acknowledged as a duplicate and not stored twice, so after a 503 or 504 (which may
    come after Redis applied the batch) the client can safely resend the same batch."""
    events = [
        (e.user_id, StoredEvent(item_id=e.item_id, type=e.type, timestamp=e.timestamp, value=e.value,
                                event_id=e.event_id))
        for e in body.events
    ]  # fmt: skip
    accepted, duplicates = await within_deadline(services, services.store.append(events))
    EVENTS_INGESTED.labels(result="stored").inc(accepted)
    EVENTS_INGESTED.labels(result="duplicate").inc(duplicates)
    return EventsResponse(accepted=accepted, duplicates=duplicates)


@v1.post(
    "/predict", response_model=PredictResponse, response_model_exclude_none=True, responses=_errors(503, 504)
)
async def predict(body: PredictRequest, services: ServicesDep) -> PredictResponse:
    """Click probability of each candidate for the user, best first. Candidates unknown to the catalog
    are scored if given with ``text`` (encoded on the fly, not added to the catalog), else listed in
    ``unknown_items``. If Redis is unreachable the answer uses ``context`` alone and says ``degraded``."""
    return await within_deadline(services, services.require_ranker().predict(body))


@v1.post(
    "/recommend",
    response_model=RecommendResponse,
    response_model_exclude_none=True,
    responses=_errors(503, 504),
)
async def recommend(body: RecommendRequest, services: ServicesDep) -> RecommendResponse:
    """The user's next items over the whole catalog: the union of vector retrieval, co-visitation of the
    user's latest items, fresh items and trending items, ordered by the ranker. A user without history
    gets trending items (recency-weighted) and fresh items, scored by the ranker."""
    return await within_deadline(services, services.require_ranker().recommend(body))


@v1.post("/items", response_model=ItemsResponse, responses=_errors(503, 504))
async def post_items(body: ItemsRequest, services: ServicesDep) -> ItemsResponse:
    """Add or update items: the text is encoded by the BERT encoder, published to Redis, then applied
    locally: this replica ranks the item from the very next request, the others within
    ``item_sync_interval_s``. An item known at training time keeps its learned ID embedding. Items new
    to the catalog join the fresh items that ``/v1/recommend`` draws from."""
    ranker = services.require_ranker()
    texts = {item.item_id: item.text for item in body.items}  # a repeated id: the last text wins

    async def upsert() -> int:
        vectors = await ranker.encode(list(texts.values()))
        items = [(item_id, text, vectors[i]) for i, (item_id, text) in enumerate(texts.items())]
        new = [item_id for item_id, row in zip(texts, ranker.catalog.index_of(list(texts)), strict=True)
               if row < 0]  # fmt: skip
        # Fresh first: a retry after a failed publish still finds the items new (the write is idempotent).
        await services.store.add_fresh(new)
        assert services.catalog_sync is not None  # set with the ranker
        await services.catalog_sync.publish(items)  # also applies them locally
        return len(items)

    upserted = await within_deadline(services, upsert())
    ITEMS_UPSERTED.inc(upserted)
    return ItemsResponse(upserted=upserted)


@v1.get("/items/{item_id}", response_model=ItemOut, responses=_errors(404, 503))
async def get_item(item_id: ItemIdPath, services: ServicesDep) -> ItemOut:
    found = services.require_ranker().catalog.get(item_id)
    if found is None:
        raise ApiError(404, "not_found", f"item {item_id!r} is not in the catalog")
    return ItemOut(item_id=item_id, text=found[0])


@v1.get("/users/{user_id}/history", response_model=HistoryResponse, response_model_exclude_none=True,
        responses=_errors(503, 504))  # fmt: skip
async def get_history(
    user_id: UserIdPath,
    services: ServicesDep,
    limit: Annotated[int | None, Query(ge=1, description="default: every stored event")] = None,
) -> HistoryResponse:
    """The user's most recent stored events, newest last."""
    n = min(limit or services.settings.history_cap, services.settings.history_cap)
    events, _ = await within_deadline(services, services.store.history(user_id, n))
    return HistoryResponse(
        user_id=user_id,
        events=[
            HistoryEvent(
                item_id=e.item_id, type=e.type, timestamp=e.timestamp, value=e.value, event_id=e.event_id
            )
            for e in events
        ],
    )


@v1.delete("/users/{user_id}", response_model=ForgetResponse, responses=_errors(503, 504))
async def forget_user(user_id: UserIdPath, services: ServicesDep) -> ForgetResponse:
    """Forget everything stored about the user (history, seen-set). Idempotent."""
    forgotten = await within_deadline(services, services.store.forget(user_id))
    return ForgetResponse(user_id=user_id, forgotten=forgotten)


@v1.get("/model", response_model=ModelInfo, responses=_errors(503))
async def model_info(services: ServicesDep) -> ModelInfo:
    ranker = services.require_ranker()
    settings, models = services.settings, ranker.models
    return ModelInfo(
        version=models.version,
        created=models.manifest.get("created"),
        dim=models.dim,
        history_length=ranker.history_length,
        catalog_size=len(ranker.catalog),
        metrics=models.manifest.get("metrics", {}),
        calibration=models.calibration.to_json(),
        providers=list(models.providers),
        batching=BatchingInfo(
            max_batch_size=settings.max_batch_size,
            max_batch_delay_ms=settings.max_batch_delay_ms,
            max_queue=settings.max_queue,
            queue_depth=ranker.batcher.queue_depth,
        ),
    )


ops = APIRouter(tags=["operations"])


@ops.get("/healthz", response_model=Status)
async def healthz() -> Status:
    """Liveness: the process answers."""
    return Status(status="ok")


@ops.get("/readyz", response_model=Status, responses=_errors(503))
async def readyz(request: Request, services: ServicesDep) -> Status | JSONResponse:
    """Readiness: the model is loaded and Redis answers ``PING`` within its deadline."""
    problems = []
    if services.ranker is None:
        problems.append(
            ErrorDetail(field="model", message=str(services.model_error), type="model_unavailable")
        )
    try:
        await services.redis.ping()
    except StoreUnavailable as exc:
        problems.append(ErrorDetail(field="redis", message=str(exc), type="store_unavailable"))
    if problems:
        message = "not ready: " + "; ".join(f"{p.field}: {p.message}" for p in problems)
        return _error_response(503, "not_ready", message, _request_id(request), details=problems)
    return Status(status="ready")


@ops.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics() -> Response:
    """Prometheus metrics, text exposition format."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The application; ``settings`` default to the ``CLICKRANK_*`` environment."""
    settings = settings or Settings()
    install_request_id_factory()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = RedisConnection.from_settings(settings)
        services = Services(settings=settings, redis=redis, store=HistoryStore.from_settings(settings, redis))
        app.state.services = services
        try:
            await _load_model(services)
            yield
        finally:
            await _shutdown(services)

    app = FastAPI(
        title="clickrank",
        version="1",
        summary="Click probability and next-item recommendations from live user histories.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(v1)
    app.include_router(ops)
    # The last added runs first: request id, metrics and the access line wrap admission control.
    # What the batcher can hold: a full queue, and the batch being inferred (never larger than the queue).
    capacity = settings.max_queue + min(settings.max_batch_size, settings.max_queue)
    app.add_middleware(AdmissionControl, max_in_flight=capacity)
    app.add_middleware(RequestContextMiddleware, max_body_bytes=settings.max_body_bytes)
    return app
