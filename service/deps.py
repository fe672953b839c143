"""What routes declare they need, as ``Annotated`` aliases: the services, the loaded model, path ids, the
API key and query checks, and the per-request deadline.

Dependencies are ``async def`` on purpose: FastAPI runs a plain ``def`` dependency in its thread pool, a
thread hop per dependency per request (5% of a predict's CPU, measured).
"""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from collections.abc import Awaitable
from typing import Annotated, TypeVar

from fastapi import APIRouter, Depends, Path, Request, Security
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader

from service.errors import ApiError, documented
from service.lifespan import LoadedModel, Services
from service.schemas.fields import ID_MAX_LENGTH, ID_PATTERN

T = TypeVar("T")


async def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_model(services: ServicesDep) -> LoadedModel:
    """The loaded model, or 503 ``model_unavailable`` saying why there is none."""
    if services.model is None:
        raise ApiError(503, "model_unavailable", f"the model is not available: {services.model_error}")
    return services.model


ModelDep = Annotated[LoadedModel, Depends(get_model)]
UserIdPath = Annotated[str, Path(min_length=1, max_length=ID_MAX_LENGTH, pattern=ID_PATTERN)]
ItemIdPath = Annotated[str, Path(min_length=1, max_length=ID_MAX_LENGTH, pattern=ID_PATTERN)]
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


def v1_router(route_class: type[APIRoute] = APIRoute) -> APIRouter:
    """A router of the versioned API: under ``/v1``, behind the API key and the query check.

    Each resource module makes its own: with FastAPI's nested routers the matched route would only know
    its path below the prefix, and metrics and access lines name the full route template."""
    return APIRouter(
        prefix="/v1",
        route_class=route_class,
        dependencies=[Depends(require_api_key), Depends(check_query)],
        responses=documented(401, 413, 422, 500),
    )
