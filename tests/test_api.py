"""The v1 API through real HTTP (ASGI) against a real redis-server and a real exported model.

One app per module and Redis mode (the model loads once per mode): the whole contract runs on a single
Redis and on a 3-primary, 3-replica Redis Cluster (``redis_target``); tests that need an empty Redis take
the ``empty_redis`` fixture, which flushes it. The parity test recomputes click probabilities with
onnxruntime directly on ``ranker.onnx`` from features built by hand, independently of the service's code
path.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, get_args

import httpx
import numpy as np
import pytest
from conftest import RedisTarget
from fastapi import FastAPI
from helpers import app_settings, metric, metric_samples, running_app
from oracle import ModelFiles

from models.features import EVENT_TYPES
from service.ranking import influences
from service.retrieval import top_rows
from service.schemas.events import ContextEvent
from service.schemas.fields import EventType, parse_timestamp
from service.settings import Settings
from service.window import merge_events

pytestmark = pytest.mark.anyio

NOW = time.time()


@pytest.fixture(scope="module")
async def api(redis_target: RedisTarget, model_dir: Path) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    settings = app_settings(
        redis_target.url,
        model_dir,
        redis_mode=redis_target.mode,
        shard_merge_cache_s=0.0,  # Redis is flushed between tests: no stale merge (cached: test_cluster.py)
        max_batch_delay_ms=10.0,
        retrieval_size=100,
        item_sync_interval_s=0.2,
        covisit_weight=0.0,  # the model alone, checked by hand below (the blend: test_candidates.py)
    )
    async with running_app(settings) as handle:
        yield handle


@pytest.fixture()
def client(api: tuple[httpx.AsyncClient, FastAPI], empty_redis: RedisTarget) -> httpx.AsyncClient:
    """The module's client, with Redis flushed for this test."""
    return api[0]


@pytest.fixture(scope="module")
def files(model_dir: Path, api: tuple[httpx.AsyncClient, FastAPI]) -> ModelFiles:
    model = ModelFiles(model_dir)
    model.live_catalog = lambda: np.asarray(api[1].state.services.model.catalog.vectors, dtype=np.float64)
    return model


def event(user: str, item: str, ts: float, kind: str = "click", **extra: Any) -> dict[str, Any]:
    return {"user_id": user, "item_id": item, "type": kind, "timestamp": ts, **extra}


async def post_events(client: httpx.AsyncClient, events: list[dict[str, Any]]) -> dict[str, int]:
    response = await client.post("/v1/events", json={"events": events})
    assert response.status_code == 200, response.text
    return response.json()


async def history(client: httpx.AsyncClient, user: str) -> list[dict[str, Any]]:
    response = await client.get(f"/v1/users/{user}/history")
    assert response.status_code == 200, response.text
    return response.json()["events"]


def user_history(files: ModelFiles, user: str, n: int, seed: int) -> list[dict[str, Any]]:
    """n events of catalog items with mixed types, ratings and gaps, in time order."""
    rng = np.random.default_rng(seed)
    items = rng.choice(len(files.item_ids), size=n, replace=False)
    kinds = ["view", "click", "add_to_cart", "purchase", "rate"]
    ts = NOW - 86400 * 30 + np.cumsum(rng.integers(30, 50000, size=n))
    out = []
    for i, row in enumerate(items.tolist()):
        kind = kinds[int(rng.integers(len(kinds)))]
        extra = {"value": int(rng.integers(1, 6))} if kind == "rate" else {}
        out.append(event(user, files.item_ids[row], float(ts[i]), kind, event_id=f"{user}-{i}", **extra))
    return out


# ---------------------------------------------------------------------------------------------- operations


async def test_health_ready_model_info_and_openapi(client: httpx.AsyncClient, files: ModelFiles) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}

    info = (await client.get("/v1/model")).json()
    assert info["version"] == files.manifest["version"]
    assert info["metrics"] == files.manifest["metrics"]
    assert info["calibration"] == files.manifest["calibration"]  # the one the probabilities are built with
    assert "CPUExecutionProvider" in info["providers"]
    assert info["history_length"] == min(50, files.history_length)
    assert info["catalog_size"] >= len(files.item_ids)
    assert info["batching"]["max_batch_size"] == 64 and info["batching"]["max_batch_delay_ms"] == 10.0

    schema = (await client.get("/openapi.json")).json()
    paths = schema["paths"]
    for path in (
        "/v1/events",
        "/v1/predict",
        "/v1/recommend",
        "/v1/items",
        "/v1/items/{item_id}",
        "/v1/users/{user_id}/history",
        "/v1/users/{user_id}",
        "/v1/model",
        "/healthz",
        "/readyz",
    ):
        assert path in paths, path  # fmt: skip
    assert schema["components"]["schemas"]["PredictRequest"]["examples"]


async def test_request_id_is_echoed_or_generated(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    generated = (await client.get("/healthz")).headers["x-request-id"]
    assert len(generated) == 32


async def test_unknown_route_method_and_oversized_body_are_json_errors(client: httpx.AsyncClient) -> None:
    missing = await client.get("/v1/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong_method = await client.get("/v1/predict")
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"
    big = await client.post(
        "/v1/events", content=b"x" * 1_000_001, headers={"content-type": "application/json"}
    )
    assert big.status_code == 413 and big.json()["error"]["code"] == "payload_too_large"

    async def chunks() -> AsyncIterator[bytes]:  # streamed: no Content-Length to check up front
        for _ in range(3):
            yield b" " * 400_000

    streamed = await client.post("/v1/events", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413 and streamed.json()["error"]["code"] == "payload_too_large"


# -------------------------------------------------------------------------------------------------- events


async def test_events_history_newest_last_and_forget(client: httpx.AsyncClient, files: ModelFiles) -> None:
    a, b, c = files.item_ids[:3]
    events = [
        event("u1", a, NOW - 100, "rate", value=4, event_id="e1"),
        event("u1", b, "2024-05-01T12:00:00Z", "view"),  # RFC 3339, oldest
        event("u1", c, NOW - 10, "purchase"),
    ]
    assert await post_events(client, events) == {"accepted": 3, "duplicates": 0}

    stored = await history(client, "u1")
    assert [e["item_id"] for e in stored] == [b, a, c]
    assert stored[0]["timestamp"] == 1714564800.0
    assert stored[1] == {"item_id": a, "type": "rate", "timestamp": NOW - 100, "value": 4.0, "event_id": "e1"}
    limited = (await client.get("/v1/users/u1/history", params={"limit": 2})).json()["events"]
    assert [e["item_id"] for e in limited] == [a, c]

    forgotten = await client.delete("/v1/users/u1")
    assert forgotten.status_code == 200 and forgotten.json() == {"user_id": "u1", "forgotten": True}
    assert await history(client, "u1") == []
    assert (await client.delete("/v1/users/u1")).json()["forgotten"] is False


async def test_retried_batch_is_stored_once(client: httpx.AsyncClient, files: ModelFiles) -> None:
    batch = [event("u2", files.item_ids[i], NOW - 50 + i, event_id=f"retry-{i}") for i in range(5)]
    assert await post_events(client, batch) == {"accepted": 5, "duplicates": 0}
    assert await post_events(client, batch) == {"accepted": 0, "duplicates": 5}
    extended = [*batch[:2], event("u2", files.item_ids[9], NOW, event_id="retry-new")]
    assert await post_events(client, extended) == {"accepted": 1, "duplicates": 2}
    assert len(await history(client, "u2")) == 6


TOO_MANY = [event("u3", "1", NOW + i) for i in range(1001)]


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"events": [event("u3", "1", NOW), event("bad user", "1", NOW)]}, "events[1].user_id"),
        ({"events": [event("u3", "x" * 129, NOW)]}, "events[0].item_id"),
        ({"events": TOO_MANY}, "events"),
        ({"events": []}, "events"),
        ({"events": [event("u3", "1", NOW, "like")]}, "events[0].type"),
        ({"events": [event("u3", "1", "yesterday")]}, "events[0].timestamp"),
        ({"events": [event("u3", "1", "2024-05-01T12:00:00")]}, "events[0].timestamp"),
        ({"events": [event("u3", "1", NOW * 1000)]}, "events[0].timestamp"),
        ({"events": [event("u3", "1", NOW, value="five")]}, "events[0].value"),
        ({"events": [event("u3", "1", NOW, rating=5)]}, "events[0].rating"),
        ({"events": [event("u3", "1", NOW)], "user": "u3"}, "user"),
        ({"event": [event("u3", "1", NOW)]}, "events"),
    ],
)
async def test_invalid_events_are_422_and_write_nothing(
    client: httpx.AsyncClient, empty_redis: RedisTarget, payload: dict[str, Any], field: str
) -> None:
    response = await client.post("/v1/events", json=payload)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    assert error["message"].startswith(f"{field}: ") or f"; {field}: " in error["message"], error["message"]
    assert field in [d["field"] for d in error["details"]]
    assert empty_redis.dbsize() == 0
    assert await history(client, "u3") == []


async def test_malformed_json_is_422(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/events", content=b'{"events": [', headers={"content-type": "application/json"}
    )
    assert response.status_code == 422 and response.json()["error"]["code"] == "validation_error"


@pytest.mark.parametrize(
    ("path", "payload", "field"),
    [
        ("/v1/predict", {"user_id": "u4", "candidates": []}, "candidates"),
        ("/v1/predict", {"user_id": "u4", "candidates": ["ok", "not ok"]}, "candidates[1]"),
        ("/v1/predict", {"user_id": "u4", "candidates": [{"item_id": "n1"}]}, "candidates[0].text"),
        ("/v1/predict", {"user_id": "u4", "candidates": [7]}, "candidates[0]"),
        ("/v1/predict", {"user_id": "u4", "candidates": ["1"], "top_k": 0}, "top_k"),
        ("/v1/predict", {"user_id": "u4", "candidates": ["1"], "explian": True}, "explian"),
        (
            "/v1/predict",
            {"user_id": "u4", "candidates": ["1"], "context": [{"item_id": "1"}]},
            "context[0].type",
        ),
        ("/v1/recommend", {"user_id": "u4", "top_k": 101}, "top_k"),
        ("/v1/recommend", {"user_id": ""}, "user_id"),
        ("/v1/items", {"items": [{"item_id": "n1", "text": "   "}]}, "items[0].text"),
        ("/v1/items", {"items": [{"item_id": "n1", "text": "x" * 2001}]}, "items[0].text"),
    ],
)
async def test_invalid_requests_are_422_naming_the_field(
    client: httpx.AsyncClient, path: str, payload: dict[str, Any], field: str
) -> None:
    response = await client.post(path, json=payload)
    assert response.status_code == 422, response.text
    assert field in [d["field"] for d in response.json()["error"]["details"]]
    assert field in response.json()["error"]["message"]


async def test_invalid_path_ids_are_422(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v1/users/bad%20user/history")).status_code == 422
    assert (await client.delete("/v1/users/" + "u" * 129)).status_code == 422
    assert (await client.get("/v1/items/bad%20id")).status_code == 422
    missing = await client.get("/v1/items/no-such-item")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


# ------------------------------------------------------------------------------------------------- predict


async def test_predict_matches_onnxruntime_run_by_hand(client: httpx.AsyncClient, files: ModelFiles) -> None:
    events = user_history(files, "parity", 12, seed=1)
    await post_events(client, events)
    candidates = [files.item_ids[i] for i in range(20, 60, 2)]
    response = await client.post(
        "/v1/predict", json={"user_id": "parity", "candidates": [*candidates, "no-such-item"]}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == files.manifest["version"]
    assert body["history_length"] == 12 and body["degraded"] is False
    assert body["unknown_items"] == ["no-such-item"]

    expected = dict(zip(candidates, files.probabilities(events, candidates).tolist(), strict=True))
    got = {p["item_id"]: p["click_probability"] for p in body["predictions"]}
    assert got.keys() == expected.keys()
    for item_id, probability in expected.items():
        assert got[item_id] == pytest.approx(probability, abs=1e-5), item_id
    assert [p["rank"] for p in body["predictions"]] == list(range(1, len(candidates) + 1))
    assert [p["item_id"] for p in body["predictions"]] == sorted(expected, key=lambda i: -expected[i])
    assert all("influences" not in p for p in body["predictions"])


async def test_predict_context_top_k_and_explain(client: httpx.AsyncClient, files: ModelFiles) -> None:
    stored = user_history(files, "ctx", 6, seed=2)
    await post_events(client, stored)
    context = [
        {"item_id": files.item_ids[300], "type": "click", "timestamp": NOW},
        {"item_id": "not-in-catalog", "type": "view", "timestamp": NOW + 1},  # skipped, not an error
        {**{k: v for k, v in stored[-1].items() if k != "user_id"}},  # same event_id as stored: counted once
    ]
    candidates = files.item_ids[100:110]
    request = {"user_id": "ctx", "candidates": candidates, "context": context, "top_k": 3, "explain": True}
    body = (await client.post("/v1/predict", json=request)).json()
    assert body["history_length"] == 7
    assert len(body["predictions"]) == 3

    merged = [*stored, {**context[0], "user_id": "ctx"}]
    expected = files.probabilities(merged, candidates)
    best = np.argsort(-expected)[:3]
    assert [p["item_id"] for p in body["predictions"]] == [candidates[i] for i in best]
    history_items = {e["item_id"] for e in merged}
    for prediction in body["predictions"]:
        influences = prediction["influences"]
        assert len(influences) == 5
        assert {i["item_id"] for i in influences} <= history_items
        weights = [abs(i["weight"]) for i in influences]
        assert weights == sorted(weights, reverse=True) and sum(weights) <= 1.0001


async def test_strongest_influence_is_the_item_whose_removal_moves_the_probability_most(
    client: httpx.AsyncClient, files: ModelFiles
) -> None:
    """Influences are leave-one-out effects: checked against the oracle's probabilities with each history
    item left out, for 40 candidates, and once through the API with the strongest item really absent."""
    history_events = user_history(files, "loo", 12, seed=5)
    await post_events(client, history_events)
    candidates = files.item_ids[400:440]
    request = {"user_id": "loo", "candidates": candidates, "explain": True}
    body = (await client.post("/v1/predict", json=request)).json()
    full = dict(zip(candidates, files.probabilities(history_events, candidates).tolist(), strict=True))
    items = [e["item_id"] for e in history_events]
    without = {
        item: files.probabilities([e for e in history_events if e["item_id"] != item], candidates)
        for item in items
    }
    for prediction in body["predictions"]:
        c = candidates.index(prediction["item_id"])
        deltas = np.array([full[candidates[c]] - without[item][c] for item in items])
        strongest = prediction["influences"][0]
        assert abs(deltas[items.index(strongest["item_id"])]) >= np.abs(deltas).max() * (1 - 1e-3)
        for influence in prediction["influences"]:
            expected = deltas[items.index(influence["item_id"])] / np.abs(deltas).sum()
            assert influence["weight"] == pytest.approx(expected, abs=2e-3), influence

    top = body["predictions"][0]
    dropped = top["influences"][0]["item_id"]
    await post_events(client, [{**e, "user_id": "loo-b"} for e in history_events if e["item_id"] != dropped])
    request = {"user_id": "loo-b", "candidates": [top["item_id"]]}
    again = (await client.post("/v1/predict", json=request)).json()
    change = top["click_probability"] - again["predictions"][0]["click_probability"]
    assert np.sign(change) == np.sign(top["influences"][0]["weight"]) and change != 0


async def test_predict_unknown_candidates(client: httpx.AsyncClient, files: ModelFiles) -> None:
    text = files.texts[5]
    body = (
        await client.post(
            "/v1/predict",
            json={
                "user_id": "u5",
                "candidates": ["ghost-1", {"item_id": "ghost-2", "text": text}, "ghost-1"],
            },
        )
    ).json()
    assert body["unknown_items"] == ["ghost-1"]
    assert [p["item_id"] for p in body["predictions"]] == ["ghost-2"]
    assert 0.0 < body["predictions"][0]["click_probability"] < 1.0
    assert (await client.get("/v1/items/ghost-2")).status_code == 404  # scored on the fly, not added

    none = (await client.post("/v1/predict", json={"user_id": "u5", "candidates": ["ghost-3"]})).json()
    assert none["predictions"] == [] and none["unknown_items"] == ["ghost-3"]


# ----------------------------------------------------------------------------------------- items, recommend


async def test_new_item_is_served_at_once_and_exclude_seen_covers_all_history(
    api: tuple[httpx.AsyncClient, FastAPI], empty_redis: RedisTarget, files: ModelFiles
) -> None:
    """The user has touched every catalog item but three (far beyond the history the ranker reads):
    recommend can only return those three, then also the item added a moment ago."""
    client, app = api
    catalog_ids = list(app.state.services.model.catalog.item_ids)
    keep = set(catalog_ids[10:13])
    touched = [item for item in catalog_ids if item not in keep]
    for start in range(0, len(touched), 1000):
        chunk = touched[start : start + 1000]
        await post_events(
            client, [event("heavy", item, NOW - 1e5 + start + i) for i, item in enumerate(chunk)]
        )

    body = (await client.post("/v1/recommend", json={"user_id": "heavy", "top_k": 10})).json()
    assert {i["item_id"] for i in body["items"]} == keep
    assert body["history_length"] == min(50, files.history_length)

    new_item = {"item_id": "fresh:1", "text": files.texts[int(files.row[touched[-1]])] + " (director's cut)"}
    response = await client.post("/v1/items", json={"items": [new_item]})
    assert response.status_code == 200 and response.json() == {"upserted": 1}
    assert (await client.get("/v1/items/fresh:1")).json() == new_item

    body = (await client.post("/v1/recommend", json={"user_id": "heavy", "top_k": 10})).json()
    assert {i["item_id"] for i in body["items"]} == keep | {"fresh:1"}
    probabilities = [i["click_probability"] for i in body["items"]]
    assert probabilities == sorted(probabilities, reverse=True)

    predicted = (
        await client.post("/v1/predict", json={"user_id": "heavy", "candidates": ["fresh:1"]})
    ).json()
    assert predicted["unknown_items"] == []
    assert predicted["predictions"][0]["click_probability"] == pytest.approx(
        next(i["click_probability"] for i in body["items"] if i["item_id"] == "fresh:1"), abs=1e-6
    )
    everything = (
        await client.post("/v1/recommend", json={"user_id": "heavy", "top_k": 20, "exclude_seen": False})
    ).json()
    assert len(everything["items"]) == 20


async def test_items_reach_every_replica(
    api: tuple[httpx.AsyncClient, FastAPI], empty_redis: RedisTarget, model_dir: Path
) -> None:
    """Items published through one replica reach another: at its startup and while it runs."""
    client = api[0]
    before = {"items": [{"item_id": "replica:early", "text": "Early Bird (2026) | Comedy"}]}
    assert (await client.post("/v1/items", json=before)).status_code == 200
    settings = Settings(
        redis_url=empty_redis.url,
        redis_mode=empty_redis.mode,
        model_dir=model_dir,
        device="cpu",
        item_sync_interval_s=0.1,
    )
    async with running_app(settings) as (other, _):
        assert (await other.get("/v1/items/replica:early")).json()["text"] == "Early Bird (2026) | Comedy"
        after = {"items": [{"item_id": "replica:late", "text": "Late Show (2026) | Drama"}]}
        assert (await client.post("/v1/items", json=after)).status_code == 200
        deadline = time.monotonic() + 5
        while (await other.get("/v1/items/replica:late")).status_code != 200:
            assert time.monotonic() < deadline, "the item did not reach the other replica"
            await asyncio.sleep(0.05)
        body = (await other.post("/v1/predict", json={"user_id": "r", "candidates": ["replica:late"]})).json()
        assert body["unknown_items"] == [] and len(body["predictions"]) == 1


async def test_recommend_agrees_with_predict(client: httpx.AsyncClient, files: ModelFiles) -> None:
    events = user_history(files, "warm", 20, seed=3)
    await post_events(client, events)
    body = (await client.post("/v1/recommend", json={"user_id": "warm", "top_k": 15, "explain": True})).json()
    assert body["degraded"] is False and body["history_length"] == 20
    items = [i["item_id"] for i in body["items"]]
    assert len(items) == 15 and not set(items) & {e["item_id"] for e in events}
    assert [i["rank"] for i in body["items"]] == list(range(1, 16))
    assert all(i["influences"] for i in body["items"])

    shipped = [i for i in body["items"] if i["item_id"] in files.row]  # not items added by other tests
    expected = files.probabilities(events, [i["item_id"] for i in shipped])
    assert [i["click_probability"] for i in shipped] == pytest.approx(expected.tolist(), abs=1e-5)
    assert np.all(np.diff(expected) <= 1e-6)  # ranked by probability


async def test_new_user_gets_recency_weighted_trending(client: httpx.AsyncClient, files: ModelFiles) -> None:
    old, recent, other = files.item_ids[40], files.item_ids[41], files.item_ids[42]
    month_ago = NOW - 30 * 86400
    await post_events(client, [event(f"fan{i}", old, month_ago + i) for i in range(6)])
    await post_events(client, [event("fan-r1", recent, NOW), event("fan-r2", recent, NOW + 1)])
    await post_events(client, [event("fan-o", other, NOW - 3600)])

    # top_k = 1: trending's best (2 fresh events beat 6 a month old; the order itself is tested in
    # test_store) joins the fresh items, here all three: the model picks among them.
    top1 = (await client.post("/v1/recommend", json={"user_id": "newbie", "top_k": 1})).json()
    three = [recent, old, other]
    assert [i["item_id"] for i in top1["items"]] == [three[int(np.argmax(files.probabilities([], three)))]]
    top3 = (await client.post("/v1/recommend", json={"user_id": "newbie", "top_k": 3})).json()
    assert {i["item_id"] for i in top3["items"]} == {old, recent, other}
    assert top3["history_length"] == 0 and top3["degraded"] is False
    expected = files.probabilities([], [i["item_id"] for i in top3["items"]])
    assert [i["click_probability"] for i in top3["items"]] == pytest.approx(expected.tolist(), abs=1e-5)

    # Fewer trending items than asked for: topped up with the best of the history-free prior.
    top5 = (await client.post("/v1/recommend", json={"user_id": "newbie", "top_k": 5})).json()
    prior = files.probabilities([], files.item_ids)
    prior[[files.row[i] for i in (old, recent, other)]] = -1
    top_up = {files.item_ids[j] for j in np.argsort(-prior)[:2]}
    assert {i["item_id"] for i in top5["items"]} == {old, recent, other} | top_up

    # Context events count as history and as seen: the item just clicked is not recommended back.
    clicked = {"item_id": recent, "type": "click", "timestamp": NOW + 5}
    with_ctx = (
        await client.post("/v1/recommend", json={"user_id": "newbie", "top_k": 10, "context": [clicked]})
    ).json()
    assert with_ctx["history_length"] == 1 and len(with_ctx["items"]) == 10
    assert recent not in {i["item_id"] for i in with_ctx["items"]}


async def test_new_user_on_empty_store_gets_the_model_prior(
    client: httpx.AsyncClient, files: ModelFiles
) -> None:
    body = (await client.post("/v1/recommend", json={"user_id": "first", "top_k": 5})).json()
    assert body["degraded"] is False and body["history_length"] == 0 and len(body["items"]) == 5
    prior = files.probabilities([], files.item_ids)
    shipped = [i for i in body["items"] if i["item_id"] in files.row]  # not items added by other tests
    assert [i["item_id"] for i in shipped] == [files.item_ids[j] for j in np.argsort(-prior)[: len(shipped)]]
    expected = [prior[files.row[i["item_id"]]] for i in shipped]
    assert [i["click_probability"] for i in shipped] == pytest.approx(expected, abs=1e-5)


async def test_the_prior_is_extended_for_new_and_changed_items_only(
    api: tuple[httpx.AsyncClient, FastAPI], files: ModelFiles, empty_redis: RedisTarget
) -> None:
    """Computed at model load; an item added or updated later gets its prior at the next use, the other
    rows are kept (the whole catalog is not recomputed), and every row equals the graph run by hand."""
    client, app = api
    ranker = app.state.services.model.ranker
    first = {"item_id": "prior-changed", "text": "Prior Movie (2030) | Horror"}
    assert (await client.post("/v1/items", json={"items": [first]})).status_code == 200
    before = (await ranker.prior_logits()).copy()
    new = {"item_id": "prior-new", "text": "Another Prior Movie (2031) | Comedy"}
    changed = {"item_id": "prior-changed", "text": "Prior Movie, recut (2030) | Western"}
    assert (await client.post("/v1/items", json={"items": [new, changed]})).status_code == 200
    calls = ranker.batcher  # the rows recomputed go through the batcher: count the candidates it scores
    scored: list[int] = []
    submit = calls.submit

    async def counting(request: Any) -> Any:
        scored.append(len(request.candidate_vectors))
        return await submit(request)

    calls.submit = counting  # type: ignore[method-assign]
    try:
        after = await ranker.prior_logits()
    finally:
        calls.submit = submit  # type: ignore[method-assign]
    catalog = app.state.services.model.catalog
    assert len(after) == len(catalog) and sum(scored) == 2, "only the new and the changed row"
    vectors = np.asarray(catalog.vectors, dtype=np.float32)
    for item_id in (new["item_id"], changed["item_id"]):
        row = int(catalog.index_of([item_id])[0])
        expected = files._run([], vectors[row : row + 1])[0][0]
        assert after[row] == pytest.approx(expected, abs=1e-4)
    untouched = [r for r in range(len(before)) if r != int(catalog.index_of([changed["item_id"]])[0])]
    np.testing.assert_array_equal(after[untouched], before[untouched])


# --------------------------------------------------------------------------------------------- concurrency


async def test_concurrent_predicts_are_batched_without_cross_talk(
    client: httpx.AsyncClient, files: ModelFiles
) -> None:
    users = [f"c{i}" for i in range(50)]
    histories = {u: user_history(files, u, 3 + i % 9, seed=100 + i) for i, u in enumerate(users)}
    await post_events(client, [e for u in users for e in histories[u]])
    rng = np.random.default_rng(7)
    requests = {
        u: {
            "user_id": u,
            "candidates": [files.item_ids[j] for j in rng.choice(200, 5 + i % 20, replace=False)],
        }
        for i, u in enumerate(users)
    }

    async def predict(u: str) -> dict[str, float]:
        response = await client.post("/v1/predict", json=requests[u])
        assert response.status_code == 200, response.text
        return {p["item_id"]: p["click_probability"] for p in response.json()["predictions"]}

    async def batches() -> tuple[float, float]:
        """Batches so far: all, and those of more than one request."""
        text = (await client.get("/metrics")).text
        every = metric(text, "clickrank_batch_size_count")
        return every, every - metric(text, "clickrank_batch_size_bucket", le="1.0")

    alone = {u: await predict(u) for u in users[:10]}
    before = await batches()
    together = dict(zip(users, await asyncio.gather(*(predict(u) for u in users)), strict=True))
    after = await batches()

    for u in users[:10]:
        assert together[u].keys() == alone[u].keys()
        for item_id, p in alone[u].items():
            assert together[u][item_id] == pytest.approx(p, abs=1e-6)
    for u in users:
        expected = files.probabilities(histories[u], requests[u]["candidates"])
        got = [together[u][c] for c in requests[u]["candidates"]]
        assert got == pytest.approx(expected.tolist(), abs=1e-5), u

    assert after[1] - before[1] >= 1, "no two of 50 concurrent predicts shared a batch"
    assert after[0] - before[0] < 50


async def test_metrics_count_requests_by_route(client: httpx.AsyncClient) -> None:
    async def counts() -> tuple[float, float, float]:
        """Predicts answered 200 and 422, and predicts timed."""
        text = (await client.get("/metrics")).text
        answered = [
            metric(text, "clickrank_requests_total", method="POST", route="/v1/predict", status=status)
            for status in ("200", "422")
        ]
        return answered[0], answered[1], metric(text, "clickrank_request_seconds_count", route="/v1/predict")

    before = await counts()
    assert (
        await client.post("/v1/predict", json={"user_id": "m", "candidates": ["nope"]})
    ).status_code == 200
    assert (await client.post("/v1/predict", json={"user_id": "m", "candidates": []})).status_code == 422
    assert (await client.get("/v1/users/m/history")).status_code == 200
    after = await counts()
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 2]
    text = (await client.get("/metrics")).text
    routes = {dict(labels)["route"] for labels in metric_samples(text, "clickrank_requests_total")}
    assert "/v1/users/{user_id}/history" in routes
    assert not any(route.startswith("/v1/users/m") for route in routes)  # templates, not raw paths


# ------------------------------------------------------------------------------------- pure request logic


def test_event_types_of_the_api_are_the_model_features() -> None:
    assert get_args(EventType) == EVENT_TYPES


@pytest.mark.parametrize(
    ("given", "seconds"),
    [(1714564800, 1714564800.0), (1714564800.5, 1714564800.5), ("2024-05-01T14:00:00+02:00", 1714564800.0),
     ("2024-05-01T12:00:00.250Z", 1714564800.25)],
)  # fmt: skip
def test_timestamps_normalise_to_unix_seconds(given: float | str, seconds: float) -> None:
    assert parse_timestamp(given) == seconds


@pytest.mark.parametrize("given", [True, -1, float("inf"), "2024-05-01", "1714564800", 1714564800000])
def test_bad_timestamps_are_refused(given: Any) -> None:
    with pytest.raises(ValueError, match="timestamp"):
        parse_timestamp(given)


def test_merge_orders_by_time_and_skips_context_already_stored() -> None:
    stored = [ContextEvent(item_id="a", type="click", timestamp=10.0, event_id="e1"),
              ContextEvent(item_id="b", type="view", timestamp=30.0)]  # fmt: skip
    context = [
        ContextEvent(item_id="a", type="click", timestamp=10.0, event_id="e1"),
        ContextEvent(item_id="c", type="view", timestamp=20.0),
        ContextEvent(item_id="d", type="rate", timestamp=30.0, value=4),
    ]
    merged = merge_events(stored, context)
    assert [(e.item_id, e.timestamp) for e in merged] == [("a", 10.0), ("c", 20.0), ("b", 30.0), ("d", 30.0)]


def test_top_rows_never_returns_excluded_rows() -> None:
    scores = np.array([5.0, 1.0, 9.0, 7.0, 3.0], dtype=np.float32)
    assert top_rows(scores, 3, np.array([2], dtype=np.int64)).tolist() == [3, 0, 4]
    assert top_rows(scores, 10, np.array([0, 1, 2, 2], dtype=np.int64)).tolist() == [3, 4]
    assert top_rows(scores, 1, np.array([0, 1, 2, 2], dtype=np.int64)).tolist() == [3]
    assert top_rows(scores, 2, np.arange(5)).tolist() == []


def test_influences_are_signed_effects_normalised_by_their_absolute_sum() -> None:
    deltas = np.array([0.02, -0.05, 0.0, 0.03])
    result = influences(deltas, ["a", "b", "c", "d"], top=3)
    assert [(i["item_id"], i["weight"]) for i in result] == [("b", -0.5), ("d", 0.3), ("a", 0.2)]
    assert [i["weight"] for i in influences(np.zeros(2), ["a", "b"])] == [0.0, 0.0]
