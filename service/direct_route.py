"""The fast path of ``/v1/predict`` and ``/v1/recommend``: a valid request goes straight to the endpoint.

FastAPI resolves a route's dependencies anew for every request: the body parsed by the standard ``json``
module and validated from Python objects, then each dependency solved through its signature and a cache
key. On a predict that was 17% of the event loop's time (py-spy under ``wrk``, ``docs/benchmarks.md``), as
much as the ranker's history read and window together; FastAPI's exception middleware, router and route
wrappers took another 7%. ``DirectLane``, a middleware, answers a request with a JSON body of declared
length that validates in one pass of pydantic's own JSON parser (``model_validate_json``) before any of
that: ``DirectRoute.answer`` calls the same dependency functions itself, in the order FastAPI would (API
key, query check, services, model), then the endpoint. Its exceptions go through the same handlers, by
Starlette's own ``ExceptionMiddleware`` built from the app's.

Everything else (another content type, an empty or chunked body, invalid JSON, a body that does not
validate) continues to FastAPI's own handler for the route, so every error answer is FastAPI's, as before.
OpenAPI is unchanged: the route is declared like any other. ``app.dependency_overrides`` reaches only
FastAPI's handler, not the direct path (the service and its tests use none).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.deps import check_query, get_model, get_services, require_api_key

RESOLVED = (require_api_key, check_query, get_services, get_model)
"""The dependencies a direct route's endpoint may have, in FastAPI's order: the v1 router's two, then the
endpoint's ``ServicesDep`` and ``ModelDep``."""

_BODY = "clickrank.direct_body"
"""Scope key: the validated body ``DirectLane`` hands to the route it answers with."""


def _is_json(content_type: str | None) -> bool:
    return content_type is not None and content_type.partition(";")[0].strip().lower() == "application/json"


class DirectRoute(APIRoute):
    """An endpoint ``async def f(body: SomeModel, services: ServicesDep, model: ModelDep) -> Response`` (any
    parameter names) under the v1 router; other dependencies are refused when the route is built. Reached
    through FastAPI, it is an ordinary route; ``DirectLane`` answers valid requests with ``answer``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        calls = tuple(dependency.call for dependency in self.dependant.dependencies)
        if calls != RESOLVED or self.body_field is None or len(self.dependant.body_params) != 1:
            raise TypeError(f"{self.path}: a DirectRoute resolves exactly {RESOLVED}, got {calls}")
        self.body_model: type[BaseModel] = self.body_field.field_info.annotation  # type: ignore[assignment]
        names = {dependency.call: dependency.name for dependency in self.dependant.dependencies}
        self._names = (self.dependant.body_params[0].name, names[get_services], names[get_model])

    async def answer(self, request: Request, body: BaseModel) -> Response:
        """The endpoint's answer to a validated ``body``, its dependencies called as FastAPI would."""
        services = await get_services(request)
        await require_api_key(services, request.headers.get("x-api-key"))
        if request.scope["query_string"]:
            await check_query(request)
        model = await get_model(services)
        body_name, services_name, model_name = self._names
        return await self.endpoint(**{body_name: body, services_name: services, model_name: model})


class DirectLane:
    """ASGI middleware: a POST to a ``DirectRoute``'s path with a JSON body of declared length that validates
    is answered by that route (``DirectRoute.answer``) here; every other request continues to ``app`` (the
    body, if read, replayed). Exceptions map to answers through ``exception_handlers``, the app's."""

    def __init__(
        self, app: ASGIApp, *, routes: Iterable[DirectRoute], exception_handlers: Mapping[Any, Any]
    ) -> None:
        self.app = app
        self.routes = {route.path: route for route in routes}
        self._answered = ExceptionMiddleware(self._answer, handlers=exception_handlers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        is_post = scope["type"] == "http" and scope["method"] == "POST"
        route = self.routes.get(scope["path"]) if is_post else None
        if route is None:
            await self.app(scope, receive, send)
            return
        content_type = length = None
        for name, value in scope["headers"]:
            if name == b"content-type":
                content_type = value.decode("latin-1")
            elif name == b"content-length":
                length = value
        if length is None or not _is_json(content_type):  # a chunked body: FastAPI reads it
            await self.app(scope, receive, send)
            return
        raw = await _read_body(receive)
        replay = _replaying(raw, receive)
        try:
            body = route.body_model.model_validate_json(raw) if raw else None
        except ValidationError:
            body = None
        if body is None:
            await self.app(scope, replay, send)
            return
        scope["route"] = route  # as FastAPI's router sets it: the metrics, the access line and check_query
        scope[_BODY] = body
        await self._answered(scope, replay, send)

    @staticmethod
    async def _answer(scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive, send)
        response = await scope["route"].answer(request, scope.pop(_BODY))
        await response(scope, receive, send)


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replaying(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives ``body`` once, as one message, then what ``receive`` gives."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
