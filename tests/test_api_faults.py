"""Faults through the real HTTP API: Redis stopped or paused, a full inference queue, a request past its
deadline, a missing or corrupt model. Each must give a defined answer, never a hang or a traceback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from fastapi import FastAPI
from helpers import app_settings, running_app, scraped_metric
from oracle import ModelFiles

from service.redis_conn import SPARE_CONNECTIONS
from service.settings import Settings

pytestmark = pytest.mark.anyio

NOW = time.time()


@pytest.fixture(scope="module")
async def resilient_app(
    redis_server: Any, model_dir: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    settings = app_settings(
        redis_server.url, model_dir, redis_timeout_ms=250.0, request_timeout_ms=5000.0, retrieval_size=50
    )
    async with running_app(settings) as handle:
        yield handle


@pytest.fixture()
def resilient(resilient_app: tuple[httpx.AsyncClient, FastAPI]) -> httpx.AsyncClient:
    return resilient_app[0]


def context_probabilities(
    model_dir: Path, context: list[dict[str, Any]], candidates: list[str]
) -> np.ndarray:
    """What the model says from the context events alone (onnxruntime run by hand)."""
    return ModelFiles(model_dir).probabilities(context, candidates)


async def wait_ready(client: httpx.AsyncClient, within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while (await client.get("/readyz")).status_code != 200:
        assert time.monotonic() < deadline, "the service did not become ready again"
        await asyncio.sleep(0.1)


async def test_redis_down_degrades_then_recovers_without_restart(
    resilient: httpx.AsyncClient, redis_server: Any, redis_url: str, model_dir: Path, catalog: list[str]
) -> None:
    client = resilient
    stored = [
        {"user_id": "d1", "item_id": catalog[i], "type": "click", "timestamp": NOW - 100 + i}
        for i in range(4)
    ]
    assert (await client.post("/v1/events", json={"events": stored})).status_code == 200
    context = [
        {"item_id": catalog[20], "type": "view", "timestamp": NOW - 50},
        {"item_id": catalog[21], "type": "rate", "timestamp": NOW - 10, "value": 5},
    ]
    candidates = catalog[30:45]
    degraded_before = {
        route: await scraped_metric(client, "clickrank_degraded_total", route=route)
        for route in ("/v1/predict", "/v1/recommend")
    }

    redis_server.stop()
    try:
        started = time.monotonic()
        response = await client.post(
            "/v1/predict", json={"user_id": "d1", "candidates": candidates, "context": context}
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["degraded"] is True and body["history_length"] == len(context)
        expected = dict(
            zip(candidates, context_probabilities(model_dir, context, candidates).tolist(), strict=True)
        )
        assert {p["item_id"]: p["click_probability"] for p in body["predictions"]} == pytest.approx(
            expected, abs=1e-5
        )

        rec = await client.post("/v1/recommend", json={"user_id": "d1", "top_k": 5, "context": context})
        assert rec.status_code == 200 and rec.json()["degraded"] is True
        assert len(rec.json()["items"]) == 5
        assert not {i["item_id"] for i in rec.json()["items"]} & {e["item_id"] for e in context}
        cold = (await client.post("/v1/recommend", json={"user_id": "d1", "top_k": 3})).json()
        assert cold["degraded"] is True and cold["history_length"] == 0 and len(cold["items"]) == 3
        assert time.monotonic() - started < 3.0

        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["error"]["code"] == "not_ready" and "redis" in ready.json()["error"]["message"]
        assert "127.0.0.1" not in ready.text and str(redis_server.port) not in ready.text, "an address"
        assert (await client.get("/healthz")).status_code == 200
        # The Kubernetes readinessProbe leaves Redis out: the replica stays in service, answering degraded.
        assert (await client.get("/readyz?exclude=redis")).json() == {"status": "ready"}
        invalid = await client.get("/readyz?exclude=model")  # the model is never optional
        assert invalid.status_code == 422 and invalid.json()["error"]["code"] == "validation_error"

        events = await client.post("/v1/events", json={"events": stored})
        assert events.status_code == 503
        assert events.json()["error"]["code"] == "store_unavailable"
        assert int(events.headers["retry-after"]) >= 1
        assert (await client.get("/v1/users/d1/history")).status_code == 503
        assert (await client.delete("/v1/users/d1")).status_code == 503

        degraded = {
            route: await scraped_metric(client, "clickrank_degraded_total", route=route) - before
            for route, before in degraded_before.items()
        }
        assert degraded == {"/v1/predict": 1, "/v1/recommend": 2}
    finally:
        if redis_server.proc is None:
            redis_server.start()

    await wait_ready(client)
    fresh = [{"user_id": "d2", "item_id": catalog[5], "type": "click", "timestamp": NOW, "event_id": "after"}]
    assert (await client.post("/v1/events", json={"events": fresh})).json() == {
        "accepted": 1,
        "duplicates": 0,
    }
    body = (await client.post("/v1/predict", json={"user_id": "d2", "candidates": candidates})).json()
    assert body["degraded"] is False and body["history_length"] == 1
    assert [e["event_id"] for e in (await client.get("/v1/users/d2/history")).json()["events"]] == ["after"]


async def test_slow_redis_answers_degraded_within_the_deadline(
    resilient: httpx.AsyncClient, redis_url: str, catalog: list[str]
) -> None:
    client = resilient
    with redis.Redis.from_url(redis_url) as r:
        r.execute_command("CLIENT", "PAUSE", 1500, "ALL")
    started = time.monotonic()
    context = [{"item_id": catalog[9], "type": "click", "timestamp": NOW}]
    response = await client.post(
        "/v1/predict", json={"user_id": "slow", "candidates": catalog[:5], "context": context}
    )
    assert response.status_code == 200 and response.json()["degraded"] is True
    assert time.monotonic() - started < 1.2  # the store's deadline, not Redis' pause, bounds the answer
    assert (await client.get("/readyz")).status_code == 503
    await wait_ready(client)


async def test_full_queue_is_503_with_retry_after_and_late_answers_are_504(
    redis_server: Any, redis_url: str, model_dir: Path, catalog: list[str]
) -> None:
    """A batcher that waits 500 ms to fill a batch, a 2-slot queue and a 150 ms request deadline: a burst
    gets 503 (queue full) at once and 504 (deadline) for the queued requests, and nothing hangs."""
    settings = app_settings(
        redis_server.url,
        model_dir,
        max_batch_size=64,
        max_batch_delay_ms=500.0,
        max_queue=2,
        redis_timeout_ms=100.0,
        request_timeout_ms=150.0,
    )
    async with running_app(settings) as (client, _):
        rejected_before = await scraped_metric(client, "clickrank_queue_rejected_total")
        started = time.monotonic()
        responses = await asyncio.gather(
            *(
                client.post("/v1/predict", json={"user_id": f"b{i}", "candidates": catalog[:10]})
                for i in range(8)
            )
        )
        assert time.monotonic() - started < 2.0
        statuses = sorted(r.status_code for r in responses)
        assert set(statuses) == {503, 504}, statuses
        for response in responses:
            error = response.json()["error"]
            if response.status_code == 503:
                assert error["code"] == "overloaded" and int(response.headers["retry-after"]) >= 1
            else:
                assert error["code"] == "deadline_exceeded" and "150 ms" in error["message"]
            assert error["request_id"] == response.headers["x-request-id"]
        rejected = await scraped_metric(client, "clickrank_queue_rejected_total")
        assert rejected - rejected_before == statuses.count(503)


async def test_missing_model_starts_unready_and_keeps_the_store_routes(
    redis_server: Any, redis_url: str, tmp_path: Path
) -> None:
    missing = tmp_path / "no-model-here"
    settings = Settings(redis_url=redis_server.url, model_dir=missing, api_keys="k1, k2")
    async with running_app(settings) as (client, _):
        assert (await client.get("/healthz")).status_code == 200
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert str(missing) in ready.json()["error"]["message"]
        assert [d["field"] for d in ready.json()["error"]["details"]] == ["model"]

        key = {"X-API-Key": "k2"}
        predict = {"user_id": "u", "candidates": ["1"]}
        assert (await client.post("/v1/predict", json=predict)).status_code == 401
        assert (
            await client.post("/v1/predict", json=predict, headers={"X-API-Key": "nope"})
        ).status_code == 401
        for response in (
            await client.post("/v1/predict", json=predict, headers=key),
            await client.post("/v1/recommend", json={"user_id": "u"}, headers=key),
            await client.post("/v1/items", json={"items": [{"item_id": "n", "text": "t"}]}, headers=key),
            await client.get("/v1/items/1", headers=key),
            await client.get("/v1/model", headers=key),
        ):
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "model_unavailable"
            assert str(missing) in response.json()["error"]["message"]

        event = {"user_id": "u", "item_id": "1", "type": "view", "timestamp": NOW}
        stored = await client.post("/v1/events", json={"events": [event]}, headers=key)
        assert stored.status_code == 200 and stored.json()["accepted"] == 1
        assert (await client.get("/metrics")).status_code == 200


async def test_corrupt_model_is_reported_by_readyz(
    redis_server: Any, redis_url: str, model_dir: Path, tmp_path: Path
) -> None:
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for path in model_dir.iterdir():
        (corrupt / path.name).symlink_to(path)
    (corrupt / "ranker.onnx").unlink()
    (corrupt / "ranker.onnx").write_bytes((model_dir / "ranker.onnx").read_bytes()[:-16] + b"\0" * 16)
    async with running_app(Settings(redis_url=redis_server.url, model_dir=corrupt)) as (client, _):
        for path in ("/readyz", "/readyz?exclude=redis"):  # without a model a replica is never ready
            ready = await client.get(path)
            assert ready.status_code == 503
            assert "ranker.onnx" in ready.json()["error"]["message"]
            assert "checksum" in ready.json()["error"]["message"]


async def test_unexpected_error_is_a_json_500_with_request_id_and_a_log_line(
    resilient_app: tuple[httpx.AsyncClient, FastAPI],
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug (simulated: the ranker raises) must not leak a traceback to the client."""
    client, app = resilient_app

    async def bug(*_: Any) -> None:
        raise KeyError("secret internal detail")

    monkeypatch.setattr(app.state.services.model.ranker, "predict", bug)
    failed_before = await scraped_metric(
        client, "clickrank_requests_total", route="/v1/predict", status="500"
    )
    response = await client.post(
        "/v1/predict", json={"user_id": "x", "candidates": ["1"]}, headers={"X-Request-ID": "req-500"}
    )
    assert response.status_code == 500
    assert response.json() == {"error": {"code": "internal", "message": "internal error", "details": [],
                                         "request_id": "req-500"}}  # fmt: skip
    assert "secret" not in response.text
    assert any("req-500" in r.getMessage() and r.exc_info for r in caplog.records)
    failed = await scraped_metric(client, "clickrank_requests_total", route="/v1/predict", status="500")
    assert failed == failed_before + 1


async def test_a_saturated_event_loop_sheds_model_requests_and_serves_the_rest(
    redis_server: Any, model_dir: Path, catalog: list[str]
) -> None:
    """The loop's heartbeat measures a blocked loop; while that lag is above ``shed_loop_lag_ms`` beat after
    beat a model request gets 503 ``overloaded`` with ``Retry-After`` before any work, other routes still
    answer, and once the loop is idle again the same request gets its full answer (never ``degraded``)."""
    settings = app_settings(redis_server.url, model_dir, shed_loop_lag_ms=40.0)
    async with running_app(settings) as (client, _):
        shed_before = await scraped_metric(client, "clickrank_shed_total", reason="loop_lag")
        for _ in range(2):  # the process busy twice 200 ms, as under a burst of its own work
            time.sleep(0.2)
            for _ in range(3):  # a few loop turns (microseconds): the overdue heartbeat wakes ~200 ms late
                await asyncio.sleep(0)
        body = {"user_id": "lag-user", "candidates": catalog[:5]}
        shed = await client.post("/v1/predict", json=body)
        assert shed.status_code == 503 and int(shed.headers["retry-after"]) >= 1
        assert (
            shed.json()["error"]["code"] == "overloaded" and "event loop" in shed.json()["error"]["message"]
        )
        assert (await client.get("/healthz")).status_code == 200
        assert await scraped_metric(client, "clickrank_shed_total", reason="loop_lag") == shed_before + 1
        for _ in range(5):  # the next on-time beat clears the lag (a shared test machine may lag on its own)
            await asyncio.sleep(0.1)
            answered = await client.post("/v1/predict", json=body)
            if answered.status_code != 503:
                break
        assert answered.status_code == 200 and answered.json()["degraded"] is False


async def test_one_pause_of_the_loop_is_not_saturation(
    redis_server: Any, model_dir: Path, catalog: list[str]
) -> None:
    """One long pause (a GC, a neighbour on a shared core) makes one heartbeat late: the requests that
    queued behind it are served in full, none shed."""
    settings = app_settings(redis_server.url, model_dir, shed_loop_lag_ms=40.0)
    async with running_app(settings) as (client, _):
        body = {"user_id": "pause-user", "candidates": catalog[:5]}
        assert (await client.post("/v1/predict", json=body)).status_code == 200
        shed_before = await scraped_metric(client, "clickrank_shed_total", reason="loop_lag")
        await asyncio.sleep(0.02)  # on-time beats
        time.sleep(0.3)
        for _ in range(3):  # the overdue heartbeat wakes ~300 ms late
            await asyncio.sleep(0)
        answers = await asyncio.gather(*(client.post("/v1/predict", json=body) for _ in range(4)))
        assert [a.status_code for a in answers] == [200] * 4
        assert not any(a.json()["degraded"] for a in answers)
        assert await scraped_metric(client, "clickrank_shed_total", reason="loop_lag") == shed_before


async def test_model_requests_past_max_in_flight_are_shed_at_once(
    redis_server: Any, model_dir: Path, catalog: list[str]
) -> None:
    """``max_in_flight`` bounds the admitted model requests even with a deep queue: the rest of a burst
    gets 503 ``overloaded`` before any work; the admitted ones get full answers; the Redis pool holds one
    connection per admitted request plus the spares."""
    settings = app_settings(redis_server.url, model_dir, max_in_flight=3, max_batch_delay_ms=300.0)
    async with running_app(settings) as (client, app):
        pool = app.state.services.redis._client.connection_pool
        assert pool.max_connections == 3 + SPARE_CONNECTIONS
        shed_before = await scraped_metric(client, "clickrank_shed_total", reason="in_flight")
        timed_before = await scraped_metric(client, "clickrank_shed_seconds_count", route="/v1/predict")
        all_before = await scraped_metric(client, "clickrank_request_seconds_count", route="/v1/predict")
        body = {"user_id": "burst", "candidates": catalog[:5]}
        responses = await asyncio.gather(*(client.post("/v1/predict", json=body) for _ in range(8)))
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [200] * 3 + [503] * 5, statuses
        for r in responses:
            if r.status_code == 503:
                assert r.json()["error"]["code"] == "overloaded" and "3 requests in flight" in r.text
            else:
                assert r.json()["degraded"] is False
        assert await scraped_metric(client, "clickrank_shed_total", reason="in_flight") == shed_before + 5
        # the 5 refusals are timed apart from the 3 answers (admitted = request_seconds - shed_seconds)
        timed = await scraped_metric(client, "clickrank_shed_seconds_count", route="/v1/predict")
        assert timed == timed_before + 5
        timed_all = await scraped_metric(client, "clickrank_request_seconds_count", route="/v1/predict")
        assert timed_all == all_before + 8
