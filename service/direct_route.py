"""The route class of ``/v1/predict`` and ``/v1/recommend``: a valid request goes straight to the endpoint.

FastAPI resolves a route's dependencies anew for every request: the body parsed by the standard ``json``
module and validated from Python objects, then each dependency solved through its signature and a cache
key. On a predict that was 17% of the event loop's time (py-spy under ``wrk``, ``docs/benchmarks.md``), as
much as the ranker's history read and window together. ``DirectRoute`` handles a request with a JSON body
that validates in one pass of pydantic's own JSON parser (``model_validate_json``) by calling the same
dependency functions itself, in the order FastAPI would (API key, query check, services, model).

Everything else (another content type, an empty body, invalid JSON, a body that does not validate) is
handed to FastAPI's own handler for the route, so every error answer is FastAPI's, as before. OpenAPI is
unchanged: the route is declared like any other. ``app.dependency_overrides`` reaches only FastAPI's handler,
not the direct path (the service and its tests use none).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError

from service.deps import check_query, get_model, get_services, require_api_key

Handler = Callable[[Request], Coroutine[Any, Any, Response]]

RESOLVED = (require_api_key, check_query, get_services, get_model)
"""The dependencies a direct route's endpoint may have, in FastAPI's order: the v1 router's two, then the
endpoint's ``ServicesDep`` and ``ModelDep``."""


def _is_json(content_type: str | None) -> bool:
    return content_type is not None and content_type.partition(";")[0].strip().lower() == "application/json"


class DirectRoute(APIRoute):
    """An endpoint ``async def f(body: SomeModel, services: ServicesDep, model: ModelDep) -> Response`` (any
    parameter names) under the v1 router; other dependencies are refused when the route is built."""

    def get_route_handler(self) -> Handler:
        standard = super().get_route_handler()
        calls = tuple(dependency.call for dependency in self.dependant.dependencies)
        if calls != RESOLVED or self.body_field is None or len(self.dependant.body_params) != 1:
            raise TypeError(f"{self.path}: a DirectRoute resolves exactly {RESOLVED}, got {calls}")
        body_model: type[BaseModel] = self.body_field.field_info.annotation  # type: ignore[assignment]
        body_name = self.dependant.body_params[0].name
        names = {dependency.call: dependency.name for dependency in self.dependant.dependencies}
        services_name, model_name = names[get_services], names[get_model]
        endpoint = self.endpoint

        async def handle(request: Request) -> Response:
            raw = await request.body()
            if not raw or not _is_json(request.headers.get("content-type")):
                return await standard(request)
            try:
                body = body_model.model_validate_json(raw)
            except ValidationError:
                return await standard(request)
            services = await get_services(request)
            await require_api_key(services, request.headers.get("x-api-key"))
            if request.scope["query_string"]:
                await check_query(request)
            model = await get_model(services)
            return await endpoint(**{body_name: body, services_name: services, model_name: model})

        return handle
