"""``DirectRoute`` and ``DirectLane`` (``/v1/predict`` and ``/v1/recommend``): a valid request skips FastAPI's
router and dependency resolution, and every request gets the answer FastAPI's own handler gives, through real
HTTP (ASGI), a real redis-server and a real exported model.

The comparison runs each request twice on the same app: once as served, once with the direct path switched
off (``_is_json`` answering no, so every request takes FastAPI's handler for the route).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import fastapi.routing
import httpx
import pytest
from helpers import app_settings, running_app

from service import direct_route
from service.deps import require_api_key
from service.direct_route import DirectRoute

pytestmark = pytest.mark.anyio

KEY = {"X-API-Key": "k1"}
JSON = {"content-type": "application/json", **KEY}


@pytest.fixture(scope="module")
async def api(redis_server: Any, catalog: list[str], model_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = app_settings(redis_server.url, model_dir, api_keys="k1", max_batch_delay_ms=1.0)
    async with running_app(settings) as (client, _):
        events = [
            {"user_id": "d1", "item_id": item, "type": "click", "timestamp": 1_700_000_000 + i}
            for i, item in enumerate(catalog[:12])
        ]
        assert (await client.post("/v1/events", json={"events": events}, headers=KEY)).status_code == 200
        yield client


def _answer(response: httpx.Response) -> tuple[int, Any, str | None]:
    """Status, body without the request id (it differs per request) and ``Retry-After``."""
    body = response.json()
    if "error" in body:
        body["error"].pop("request_id", None)
    return response.status_code, body, response.headers.get("retry-after")


def _requests(catalog: list[str]) -> list[tuple[str, str, bytes, dict[str, str]]]:
    """(path and query, label, body, headers): valid requests, then each way a request can be refused."""
    item = f'"{catalog[20]}"'
    predict = f'{{"user_id": "d1", "candidates": [{item}, "{catalog[21]}", "gone"], "top_k": 2}}'.encode()
    return [
        ("/v1/predict", "valid", predict, JSON),
        ("/v1/predict", "charset", predict, {**JSON, "content-type": "application/json; charset=utf-8"}),
        ("/v1/predict", "explain", predict.replace(b'"top_k": 2', b'"explain": true'), JSON),
        (
            "/v1/predict",
            "new text",
            b'{"user_id": "d9", "candidates": [{"item_id": "n", "text": "A film"}]}',
            JSON,
        ),
        ("/v1/predict", "top_k as text", predict.replace(b"2}", b'"2"}'), JSON),
        ("/v1/recommend", "valid", b'{"user_id": "d1", "top_k": 5}', JSON),
        ("/v1/recommend", "new user", b'{"user_id": "nobody"}', JSON),
        ("/v1/predict", "no key", predict, {"content-type": "application/json"}),
        ("/v1/predict", "wrong key", predict, {**JSON, "X-API-Key": "k2"}),
        ("/v1/predict?limit=3", "unknown query", predict, JSON),
        ("/v1/predict?limit=3", "unknown query, no key", predict, {"content-type": "application/json"}),
        ("/v1/predict", "invalid JSON", b'{"user_id": "d1", "candidates": [', JSON),
        ("/v1/predict", "invalid JSON, no key", b'{"user_id"', {"content-type": "application/json"}),
        ("/v1/predict", "not UTF-8", b'{"user_id": "\xff", "candidates": ["1"]}', JSON),
        ("/v1/predict", "empty body", b"", JSON),
        ("/v1/predict", "text/plain", predict, {**JSON, "content-type": "text/plain"}),
        ("/v1/predict", "no content type", predict, KEY),
        ("/v1/predict", "+json type", predict, {**JSON, "content-type": "application/vnd.api+json"}),
        ("/v1/predict", "unknown field", predict.replace(b'"top_k"', b'"top_kk"'), JSON),
        ("/v1/predict", "bad candidate", b'{"user_id": "d1", "candidates": [7, {"item_id": "x"}]}', JSON),
        (
            "/v1/predict",
            "NaN value",
            b'{"user_id": "d1", "candidates": ["1"], "context": '
            b'[{"item_id": "1", "type": "rate", "value": NaN, "timestamp": 1}]}',
            JSON,
        ),
        ("/v1/predict", "array body", b"[1, 2]", JSON),
        ("/v1/recommend", "top_k too large", b'{"user_id": "d1", "top_k": 101}', JSON),
    ]


async def test_every_answer_is_the_one_fastapis_handler_gives(
    api: httpx.AsyncClient, catalog: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    requests = _requests(catalog)
    direct = [_answer(await api.post(path, content=body, headers=h)) for path, _, body, h in requests]
    monkeypatch.setattr(direct_route, "_is_json", lambda _: False)
    standard = [_answer(await api.post(path, content=body, headers=h)) for path, _, body, h in requests]
    for (path, label, _, _), got, expected in zip(requests, direct, standard, strict=True):
        assert got == expected, f"{path} ({label})"
    statuses = {label: status for (_, label, _, _), (status, _, _) in zip(requests, direct, strict=True)}
    assert statuses["valid"] == statuses["new user"] == statuses["top_k as text"] == 200
    assert statuses["wrong key"] == 401 and statuses["unknown query"] == 422
    assert statuses["invalid JSON"] == statuses["empty body"] == statuses["bad candidate"] == 422


async def test_valid_requests_skip_dependency_resolution(
    api: httpx.AsyncClient, catalog: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    solved: list[str] = []
    solve = fastapi.routing.solve_dependencies

    async def counted(**kwargs: Any) -> Any:
        solved.append(kwargs["request"].url.path)
        return await solve(**kwargs)

    monkeypatch.setattr(fastapi.routing, "solve_dependencies", counted)
    requests = {label: (path, body, h) for path, label, body, h in _requests(catalog)}
    for label in ("valid", "charset", "explain", "new user"):
        path, body, headers = requests[label]
        assert (await api.post(path, content=body, headers=headers)).status_code == 200
    assert solved == []
    for label in ("text/plain", "unknown field", "bad candidate"):
        path, body, headers = requests[label]
        assert (await api.post(path, content=body, headers=headers)).status_code == 422
    assert solved == ["/v1/predict"] * 3
    assert (await api.get("/v1/model", headers=KEY)).status_code == 200  # other routes: FastAPI's handler
    assert solved[-1] == "/v1/model"


async def test_the_lane_answers_valid_requests_before_the_router(
    api: httpx.AsyncClient, catalog: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    routed: list[str] = []
    handle = DirectRoute.handle

    async def counted(self: DirectRoute, scope: Any, receive: Any, send: Any) -> None:
        routed.append(scope["path"])
        await handle(self, scope, receive, send)

    monkeypatch.setattr(DirectRoute, "handle", counted)
    requests = {label: (path, body, h) for path, label, body, h in _requests(catalog)}
    for label in ("valid", "explain", "new user", "wrong key"):
        path, body, headers = requests[label]
        assert (await api.post(path, content=body, headers=headers)).status_code in (200, 401)
    assert routed == []
    path, body, headers = requests["unknown field"]  # the body, read by the lane, reaches the route whole
    answer = await api.post(path, content=body, headers=headers)
    assert answer.status_code == 422 and answer.json()["error"]["details"][0]["field"] == "top_kk"

    async def chunks() -> AsyncIterator[bytes]:
        yield body[:10]
        yield body[10:].replace(b'"top_kk"', b'"top_k"')

    chunked = await api.post(path, content=chunks(), headers=headers)  # no Content-Length: FastAPI reads it
    assert chunked.status_code == 200 and len(chunked.json()["predictions"]) == 2
    assert routed == ["/v1/predict"] * 2


def test_a_route_with_other_dependencies_is_refused() -> None:
    router = fastapi.APIRouter(route_class=DirectRoute, dependencies=[fastapi.Depends(require_api_key)])

    async def endpoint(body: dict[str, int]) -> dict[str, int]:
        return body

    with pytest.raises(TypeError, match="DirectRoute resolves exactly"):
        router.post("/v1/other")(endpoint)
