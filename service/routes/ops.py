"""Operations: liveness, readiness and Prometheus metrics (outside ``/v1``, no API key)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.deps import ServicesDep
from service.errors import documented, error_response, request_id_of
from service.metrics import exposition
from service.redis_conn import StoreUnavailable
from service.schemas.ops import ErrorDetail, Status

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> Status:
    """Liveness: the process answers."""
    return Status(status="ok")


ExcludedChecks = Annotated[
    list[Literal["redis"]] | None,
    Query(
        description="checks left out, as in Kubernetes' API server's `/readyz?exclude=`: `redis` keeps a "
        "replica ready while Redis is down, so that it stays in its Service and answers predict and "
        "recommend `degraded` instead of every replica leaving at once (the readinessProbe of deploy/k8s)"
    ),
]


@router.get("/readyz", response_model=Status, responses=documented(422, 503))
async def readyz(
    request: Request, services: ServicesDep, exclude: ExcludedChecks = None
) -> Status | JSONResponse:
    """Readiness: the model is loaded and Redis answers ``PING`` within its deadline (unless ``exclude``
    names ``redis``). The body names no address (the cause, with Redis's address, is in the log)."""
    problems = []
    if services.model is None:
        problems.append(
            ErrorDetail(field="model", message=str(services.model_error), type="model_unavailable")
        )
    if "redis" not in (exclude or ()):
        try:
            await services.redis.ping()
        except StoreUnavailable:
            message = "Redis did not answer PING within its deadline"
            problems.append(ErrorDetail(field="redis", message=message, type="store_unavailable"))
    if problems:
        message = "not ready: " + "; ".join(f"{p.field}: {p.message}" for p in problems)
        return error_response(503, "not_ready", message, request_id_of(request), details=problems)
    return Status(status="ready")


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics() -> Response:
    """Prometheus metrics, text exposition format."""
    return Response(exposition(), media_type=CONTENT_TYPE_LATEST)
