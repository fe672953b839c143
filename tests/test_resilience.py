"""Resilience with real processes: ``clickrank serve`` as a subprocess on a loopback port, a real
redis-server, real HTTP clients. Each test bounds its time and stops everything it started.

- SIGKILL during event ingestion loses no acknowledged event, and retrying every batch stores nothing twice;
- Redis killed under predict load: degraded answers and defined 503s only, recovery without a restart;
- a burst far past capacity: fast 503s with Retry-After, bounded latency for the rest, bounded memory;
- API keys enforced through the real server, health and metrics open; structured JSON logs with the
  request id, and no secret or payload in any log line;
- SIGTERM with requests in flight: they complete, the process exits 0 within the grace period.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import RedisServer
from helpers import metric, running_app
from served import Service

from service.logs import JsonFormatter, mask_secrets
from service.server import GRACEFUL_SHUTDOWN_S
from service.settings import Settings

NOW = time.time()
JSON_FIELDS = {"ts", "level", "logger", "message", "request_id"}
DEFINED_503 = {"store_unavailable", "overloaded", "shutting_down"}


@pytest.fixture()
def service(
    tmp_path: Path, redis_url: str, model_dir: Path, redis_server: RedisServer
) -> Iterator[Callable[..., Service]]:
    """A factory of started services (overrides as keyword settings); all are killed at the end, and a
    stopped Redis is started again."""
    started: list[Service] = []

    def make(**overrides: Any) -> Service:
        settings = {
            "redis_url": redis_url,
            "model_dir": str(model_dir),
            "device": "cpu",
            "intra_op_threads": "1",
            "redis_timeout_ms": "250",  # the test machine is shared: a slow scheduler is not an outage
            "shed_loop_lag_ms": "0",  # nor a reason to shed (test_api_faults tests the shedding)
        } | {k: str(v) for k, v in overrides.items()}
        svc = Service(tmp_path, settings)
        started.append(svc)
        svc.start()
        return svc

    try:
        yield make
    finally:
        for svc in started:
            svc.stop()
        if redis_server.proc is None:
            redis_server.start()


def unbounded_client(url: str, timeout_s: float = 10.0) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    return httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits)


def assert_defined_503(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert "Traceback" not in response.text
    assert response.json()["error"]["code"] in DEFINED_503, response.text
    assert int(response.headers["retry-after"]) >= 1


# ---------------------------------------------------------------------------- a. SIGKILL mid-ingest

BATCH = 20


def test_sigkill_mid_ingest_loses_no_acknowledged_event_and_retries_store_nothing_twice(
    service: Callable[..., Service], catalog: list[str]
) -> None:
    """Four clients post batches of unique event ids (one user per batch) until the server is killed with
    SIGKILL. A restarted server must hold every acknowledged batch whole; a batch in flight at the kill is
    all there or not at all; resending every batch stores nothing twice."""
    svc = service()
    sent: dict[str, list[dict[str, Any]]] = {}
    acked: set[str] = set()
    unexpected: list[str] = []

    async def client(c: int, http: httpx.AsyncClient) -> None:
        for seq in range(10_000):
            user = f"kill-{c}-{seq}"
            items = [catalog[(c * 997 + seq * 31 + i) % len(catalog)] for i in range(BATCH)]
            sent[user] = [
                {
                    "user_id": user,
                    "item_id": item,
                    "type": "click",
                    "timestamp": NOW + i,
                    "event_id": f"{user}-{i}",
                }
                for i, item in enumerate(items)
            ]
            try:
                response = await http.post("/v1/events", json={"events": sent[user]})
            except httpx.TransportError:
                return  # the server is gone
            if response.status_code == 200 and response.json() == {"accepted": BATCH, "duplicates": 0}:
                acked.add(user)
            elif response.status_code == 503:
                assert_defined_503(response)  # Redis slow on a busy machine: not acknowledged, resent below
            else:
                unexpected.append(f"{response.status_code} {response.text}")

    async def load() -> None:
        async with unbounded_client(svc.url) as http:
            clients = [asyncio.create_task(client(c, http)) for c in range(4)]
            async with asyncio.timeout(30):
                while len(acked) < 60:
                    await asyncio.sleep(0.005)
                svc.signal(signal.SIGKILL)
                await asyncio.gather(*clients)

    asyncio.run(load())
    assert svc.proc is not None and svc.proc.wait(timeout=10) == -signal.SIGKILL
    assert not unexpected, unexpected[:3]
    in_flight = set(sent) - acked
    print(
        f"\nSIGKILL after {len(acked)} acknowledged batches ({len(acked) * BATCH} events), "
        f"{len(in_flight)} in flight"
    )

    svc.start()

    async def check_and_resend() -> tuple[int, int]:
        async with unbounded_client(svc.url) as http:

            async def stored_ids(user: str) -> list[str]:
                response = await http.get(f"/v1/users/{user}/history")
                assert response.status_code == 200, response.text
                return [e["event_id"] for e in response.json()["events"]]

            users = sorted(sent)
            before = dict(zip(users, await asyncio.gather(*(stored_ids(u) for u in users)), strict=True))
            for user in acked:
                assert sorted(before[user]) == sorted(e["event_id"] for e in sent[user]), user
            for user in in_flight:
                assert len(before[user]) in (0, BATCH), f"{user}: a batch was stored in part"

            answers = await asyncio.gather(
                *(http.post("/v1/events", json={"events": sent[u]}) for u in users)
            )
            for user, response in zip(users, answers, strict=True):
                assert response.status_code == 200, response.text
                stored_before = len(before[user]) == BATCH
                assert response.json() == {
                    "accepted": 0 if stored_before else BATCH,
                    "duplicates": BATCH if stored_before else 0,
                }, user
            after = await asyncio.gather(*(stored_ids(u) for u in users))
            for user, ids in zip(users, after, strict=True):
                assert len(ids) == len(set(ids)) == BATCH, user
            return len(acked) * BATCH, sum(len(ids) for ids in before.values())

    checked, stored = asyncio.run(check_and_resend())
    print(
        f"after restart: {checked} acknowledged events all present ({stored} stored in all); "
        "resending every batch stored none twice"
    )


# ------------------------------------------------------------------------- b. Redis killed under load


def test_redis_killed_under_predict_load_degrades_then_recovers_without_restart(
    service: Callable[..., Service], redis_server: RedisServer, catalog: list[str]
) -> None:
    """Four predict clients and one event client run while Redis is stopped and started again. Every
    answer is a 200 or a defined 503 with a JSON body; with Redis down predictions come from the request's
    context, flagged degraded, within the deadline; once Redis is back the same process answers from the
    stored history again."""
    svc = service()
    candidates = catalog[:50]
    context = [{"item_id": catalog[60], "type": "click", "timestamp": NOW - 5}]
    phase = "up"
    answers: list[tuple[str, float, httpx.Response]] = []
    event_answers: list[tuple[str, str, str, httpx.Response]] = []  # (event id, phase at start, at end, ...)

    async def predictor(http: httpx.AsyncClient, c: int) -> None:
        while phase != "done":
            payload = {"user_id": f"p{c}", "candidates": candidates, "context": context}
            started, at = time.monotonic(), phase
            response = await http.post("/v1/predict", json=payload)
            # an answer counts for a phase only if it began and ended within it
            answers.append((at if phase == at else "between", time.monotonic() - started, response))

    async def ingester(http: httpx.AsyncClient) -> None:
        for seq in range(100_000):
            if phase == "done":
                return
            event_id, at = f"ev-{seq}", phase
            event = {"user_id": "p0", "item_id": catalog[seq % 40], "type": "view", "timestamp": NOW + seq,
                     "event_id": event_id}  # fmt: skip
            response = await http.post("/v1/events", json={"events": [event]})
            event_answers.append((event_id, at, phase, response))
            await asyncio.sleep(0.05)

    async def scenario() -> float:
        nonlocal phase
        async with unbounded_client(svc.url) as http:
            tasks = [asyncio.create_task(predictor(http, c)) for c in range(4)]
            tasks.append(asyncio.create_task(ingester(http)))
            try:
                await asyncio.sleep(0.7)
                phase = "stopping"
                await asyncio.to_thread(redis_server.stop)
                phase = "down"
                await asyncio.sleep(0.3)
                ready = await http.get("/readyz")
                assert ready.status_code == 503 and "redis" in ready.json()["error"]["message"]
                await asyncio.sleep(1.2)
                phase = "starting"
                await asyncio.to_thread(redis_server.start)
                phase = "restarted"
                restarted = time.monotonic()
                async with asyncio.timeout(20):
                    while (await http.get("/readyz")).status_code != 200:
                        await asyncio.sleep(0.1)
                recovery_s = time.monotonic() - restarted
                phase = "recovered"
                await asyncio.sleep(0.7)
            finally:
                phase = "done"
                await asyncio.gather(*tasks)
            return recovery_s

    recovery_s = asyncio.run(scenario())
    assert svc.proc is not None and svc.proc.poll() is None, "the service must survive without a restart"

    for _, _, response in answers:
        if response.status_code != 200:
            assert_defined_503(response)
    by_phase = {
        p: [(s, r) for at, s, r in answers if at == p and r.status_code == 200]
        for p in ("up", "down", "recovered")
    }
    assert by_phase["up"] and all(not r.json()["degraded"] for _, r in by_phase["up"])
    down = by_phase["down"]
    assert down and all(r.json()["degraded"] for _, r in down), "with Redis down every answer is degraded"
    assert all(r.json()["history_length"] == len(context) for _, r in down)
    assert max(s for s, _ in down) < 2.0, "degraded answers must come within the request deadline"
    assert by_phase["recovered"] and all(not r.json()["degraded"] for _, r in by_phase["recovered"])

    down_events = [r for _, start, end, r in event_answers if start == end == "down"]
    assert down_events, "events were posted while Redis was down"
    for response in down_events:
        assert_defined_503(response)
        assert response.json()["error"]["code"] == "store_unavailable"
    recovered = [(e, r) for e, start, end, r in event_answers if start == end == "recovered"]
    assert recovered and all(r.status_code == 200 for _, r in recovered)
    # Redis came back empty (no persistence in the test): it holds what was acknowledged since it started
    ok = [(e, start, end) for e, start, end, r in event_answers if r.status_code == 200]
    must = {e for e, start, _ in ok if start in ("restarted", "recovered")}
    may = {e for e, _, end in ok if end not in ("up", "stopping", "down")}
    stored = {e["event_id"] for e in httpx.get(f"{svc.url}/v1/users/p0/history", timeout=10).json()["events"]}
    assert must <= stored <= may
    after = httpx.post(f"{svc.url}/v1/predict", json={"user_id": "p0", "candidates": candidates}, timeout=10)
    reads = httpx.get(f"{svc.url}/v1/model", timeout=10).json()["history_length"]
    assert after.json()["degraded"] is False
    assert after.json()["history_length"] == min(len(stored), reads) > 0
    statuses = [r.status_code for _, _, r in answers]
    print(
        f"\nRedis down {len(down)} degraded answers (max {max(s for s, _ in down) * 1000:.0f} ms), "
        f"{statuses.count(503)} predict 503s, {len(down_events)} events 503 store_unavailable; "
        f"ready again {recovery_s:.2f}s after Redis restarted"
    )


# --------------------------------------------------------------------------------------- c. overload

BURST = 300


@dataclass(frozen=True)
class RawAnswer:
    seconds: float
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def raw_burst(port: int, path: str, bodies: list[bytes]) -> list[RawAnswer]:
    """POST every body at once, each on its own connection opened beforehand, timed from its first byte
    written to its last byte read. A bare HTTP/1.1 client: on two shared cores a full client library
    would spend more CPU building 300 requests than the server spends answering them."""
    connections = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port) for _ in bodies))

    async def one(body: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> RawAnswer:
        head = f"POST {path} HTTP/1.1\r\nHost: clickrank\r\nContent-Type: application/json\r\n"
        head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        started = time.monotonic()
        writer.write(head.encode() + body)
        raw = await reader.read()  # the server closes the connection after its answer
        seconds = time.monotonic() - started
        writer.close()
        response_head, _, payload = raw.partition(b"\r\n\r\n")
        status_line, *lines = response_head.decode("latin-1").split("\r\n")
        headers = {name.strip().lower(): value.strip() for name, value in (h.split(":", 1) for h in lines)}
        return RawAnswer(seconds, int(status_line.split()[1]), headers, payload)

    return await asyncio.gather(*(one(body, *conn) for body, conn in zip(bodies, connections, strict=True)))


def test_burst_far_past_capacity_is_shed_fast_and_memory_stays_bounded(
    service: Callable[..., Service], catalog: list[str]
) -> None:
    """Bursts of 300 predicts (200 candidates each) against a queue of 16: the excess is refused at
    once with 503 + Retry-After, what is admitted is answered well within the 2 s deadline, and two
    bursts leave the server's memory where it was."""
    svc = service(max_queue=16, request_timeout_ms=2000)
    bodies = [json.dumps({"user_id": f"o{i}", "candidates": catalog[:200]}).encode() for i in range(BURST)]

    asyncio.run(raw_burst(svc.port, "/v1/predict", bodies[:32]))  # warm-up: allocator arenas, batch shapes
    rss_before = svc.rss_mb()
    rejected_before = metric(httpx.get(f"{svc.url}/metrics").text, "clickrank_queue_rejected_total")
    answers = [*asyncio.run(raw_burst(svc.port, "/v1/predict", bodies))]
    answers += asyncio.run(raw_burst(svc.port, "/v1/predict", bodies))
    time.sleep(0.5)
    rss_after = svc.rss_mb()

    shed = [a for a in answers if a.status == 503]
    served = [a for a in answers if a.status == 200]
    assert len(shed) + len(served) == len(answers), {a.status for a in answers}
    assert shed and served, "the burst must both overflow the queue and be served in part"
    for answer in shed:
        assert answer.json()["error"]["code"] == "overloaded", answer.body
        assert int(answer.headers["retry-after"]) >= 1
    rejected = (
        metric(httpx.get(f"{svc.url}/metrics").text, "clickrank_queue_rejected_total") - rejected_before
    )
    assert rejected == len(shed)
    p99_shed = float(np.percentile([a.seconds for a in shed], 99))
    p99_served = float(np.percentile([a.seconds for a in served], 99))
    print(
        f"\n2 bursts of {BURST}: {len(served)} served (p99 {p99_served * 1000:.0f} ms), {len(shed)} shed "
        f"with 503 (p99 {p99_shed * 1000:.0f} ms); RSS {rss_before:.0f} MB before, {rss_after:.0f} MB after"
    )
    # Client-side times include accepting 300 connections on the same 2 cores as the test's client, so
    # they scale with the machine (shed p99 150-255 ms on one day, 543 ms on a slower one): the bounds
    # are relative to the 2 s deadline, which a refusal must never wait for.
    assert p99_shed < 1.0, "a refusal must come well before the 2 s deadline"
    assert p99_shed <= p99_served, "a refusal must not wait behind admitted work"
    assert p99_served < 1.5, "admitted requests must stay under the 2 s deadline"
    assert rss_after - rss_before < 100


def test_two_workers_share_one_whole_metrics_page(
    service: Callable[..., Service], catalog: list[str], tmp_path: Path
) -> None:
    """``CLICKRANK_WORKERS=2``: both uvicorn workers serve, and every scrape, whichever worker answers it,
    counts every request of both (prometheus client's multiprocess mode in ``CLICKRANK_METRICS_DIR``)."""
    shared = tmp_path / "metrics"
    shared.mkdir()
    (shared / "counter_1.db").write_bytes(b"stale")  # an earlier run's file: removed before the workers start
    svc = service(workers=2, metrics_dir=shared)
    body = {"user_id": "two-workers", "candidates": catalog[:5]}
    for _ in range(30):  # a new connection each: the kernel hands them to either worker
        assert httpx.post(f"{svc.url}/v1/predict", json=body, timeout=10).status_code == 200
    worker_pids = {int(f.stem.rsplit("_", 1)[1]) for f in shared.glob("*.db")}
    assert len(worker_pids) == 2 and svc.pid not in worker_pids, "both workers write, the parent does not"
    for _ in range(6):
        page = httpx.get(f"{svc.url}/metrics", timeout=10).text
        assert (
            metric(page, "clickrank_requests_total", route="/v1/predict", method="POST", status="200") == 30
        )
        assert metric(page, "clickrank_model_info") == 1  # the one loaded version (max over the workers)


# ------------------------------------------------------------------------------ d. API keys and logs

KEYS = ("key-alpha-5f1c9e", "key-beta-0a7d33")
MARKER = "payload-marker-93b1"


def test_api_keys_through_the_real_server_and_logs_hold_no_secret(
    service: Callable[..., Service], redis_url: str
) -> None:
    password = "hunter2-redis-secret"
    url_with_password = redis_url.replace("redis://", f"redis://default:{password}@")
    svc = service(api_keys=",".join(KEYS), redis_url=url_with_password, log_level="INFO")
    base = svc.url
    for path in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(base + path).status_code == 200, path

    predict = {"user_id": MARKER, "candidates": ["1", "2", f"{MARKER}-item"]}
    for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": KEYS[0][:-1]}):
        refused = httpx.post(f"{base}/v1/predict", json=predict, headers=headers)
        assert refused.status_code == 401, refused.text
        assert refused.json()["error"]["code"] == "unauthorized"
    in_query = httpx.get(f"{base}/v1/users/{MARKER}/history", params={"api_key": KEYS[0], "token": password})
    assert in_query.status_code == 401, "a key in the query string is not accepted"
    trace = "resilience-trace-1"
    ok = httpx.post(f"{base}/v1/predict", json=predict, headers={"X-API-Key": KEYS[1], "X-Request-ID": trace})
    assert ok.status_code == 200 and ok.headers["x-request-id"] == trace
    ok_events = httpx.post(
        f"{base}/v1/events",
        json={"events": [{"user_id": "u", "item_id": MARKER, "type": "view", "timestamp": NOW}]},
        headers={"X-API-Key": KEYS[0]},
    )
    assert ok_events.status_code == 200
    bad = httpx.post(
        f"{base}/v1/events", content=b'{"events": [' + MARKER.encode(), headers={"X-API-Key": KEYS[0]}
    )
    assert bad.status_code == 422

    svc.signal(signal.SIGTERM)
    assert svc.proc is not None and svc.proc.wait(timeout=GRACEFUL_SHUTDOWN_S) == 0
    text = svc.log_path.read_text()
    records = svc.log_records()  # every line is one JSON object
    assert all(set(r) >= JSON_FIELDS for r in records)
    for secret in (*KEYS, password, MARKER, "api_key=", "token="):
        assert secret not in text, f"{secret!r} leaked into the log"
    access = [r for r in records if r["logger"] == "clickrank.access"]
    traced = [r for r in access if r["request_id"] == trace]
    assert [(r["method"], r["route"], r["status"]) for r in traced] == [("POST", "/v1/predict", 200)]
    assert traced[0]["latency_ms"] > 0
    assert {r["route"] for r in access} >= {"/v1/predict", "/v1/users/{user_id}/history", "/v1/events"}
    assert sorted(r["status"] for r in access if r["route"] == "/v1/predict") == [200, 401, 401, 401]
    assert len({r["request_id"] for r in access}) == len(access), "every request has its own id"
    uvicorn_lines = [r["message"] for r in records if r["logger"].startswith("uvicorn")]
    assert (
        "Application startup complete." in uvicorn_lines and "Application shutdown complete." in uvicorn_lines
    )


def test_request_logs_are_json_with_the_request_id_and_no_payload(
    redis_url: str, model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Through the ASGI app: every record a request writes carries its id; none carries the body or key."""
    settings = Settings(redis_url=redis_url, model_dir=model_dir, device="cpu", api_keys=KEYS[0])

    async def requests() -> list[httpx.Response]:
        async with running_app(settings) as (http, _):
            headers = {"X-API-Key": KEYS[0]}
            event = {"user_id": MARKER, "item_id": f"{MARKER}-item", "type": "view", "timestamp": NOW}
            return [
                await http.post("/v1/events", json={"events": [event]}, headers=headers),
                await http.post(
                    "/v1/predict", json={"user_id": MARKER, "candidates": ["1"]}, headers=headers
                ),
                await http.post("/v1/predict", json={"user_id": MARKER, "candidates": "x"}, headers=headers),
                await http.get(f"/v1/users/{MARKER}/history?api_key={KEYS[0]}"),
            ]

    with caplog.at_level(logging.INFO):
        responses = asyncio.run(requests())
    assert [r.status_code for r in responses] == [200, 200, 422, 401]
    formatter = JsonFormatter()  # no secrets to mask: nothing may need masking
    client_loggers = ("httpx", "httpcore")
    service_records = [r for r in caplog.records if not r.name.startswith(client_loggers)]
    lines = [json.loads(formatter.format(record)) for record in service_records]
    access = [line for line in lines if line["logger"] == "clickrank.access"]
    assert [line["request_id"] for line in access] == [r.headers["x-request-id"] for r in responses]
    assert [line["status"] for line in access] == [200, 200, 422, 401]
    for line in lines:
        assert set(line) >= JSON_FIELDS
        text = json.dumps(line)
        assert MARKER not in text and KEYS[0] not in text, text


def test_formatters_mask_url_passwords_and_keys() -> None:
    record = logging.makeLogRecord(
        {
            "msg": "cannot reach %s with key %s",
            "args": ("rediss://app:s3cr%40t@redis.internal:6380/0", "k-123456"),
        }
    )
    line = json.loads(JsonFormatter(secrets=["k-123456"]).format(record))
    assert line["message"] == "cannot reach rediss://app:***@redis.internal:6380/0 with key ***"
    assert mask_secrets("redis://redis:6379/0 http://user@host/") == "redis://redis:6379/0 http://user@host/"


# ----------------------------------------------------------------------------- e. graceful shutdown


def test_sigterm_drains_requests_in_flight_and_exits_zero(
    service: Callable[..., Service], catalog: list[str]
) -> None:
    """A batcher that waits 800 ms to fill a batch holds 8 requests when SIGTERM arrives: all 8 are
    answered 200, new connections are refused, the process exits 0 well within the grace period."""
    svc = service(max_batch_delay_ms=800, max_batch_size=64, request_timeout_ms=5000)
    n = 8

    async def scenario() -> tuple[list[httpx.Response], float]:
        async with unbounded_client(svc.url) as http:
            calls = [
                asyncio.create_task(
                    http.post("/v1/predict", json={"user_id": f"t{i}", "candidates": catalog[:20]})
                )
                for i in range(n)
            ]
            async with asyncio.timeout(5):
                while metric((await http.get("/metrics")).text, "clickrank_queue_depth") < n:
                    await asyncio.sleep(0.01)
            svc.signal(signal.SIGTERM)
            signalled = time.monotonic()
            await asyncio.sleep(0.1)
            async with httpx.AsyncClient() as fresh:  # a new connection: the listener is closed
                with pytest.raises(httpx.ConnectError):
                    await fresh.get(f"{svc.url}/healthz")
            return list(await asyncio.gather(*calls)), signalled

    responses, signalled = asyncio.run(scenario())
    assert [r.status_code for r in responses] == [200] * n, [r.text for r in responses]
    assert all(len(r.json()["predictions"]) == 20 for r in responses)
    assert svc.proc is not None and svc.proc.wait(timeout=GRACEFUL_SHUTDOWN_S) == 0
    took = time.monotonic() - signalled
    assert took < GRACEFUL_SHUTDOWN_S
    print(f"\nSIGTERM with {n} requests in flight: all answered 200, exit 0 after {took:.2f}s")
    assert "Application shutdown complete." in [r["message"] for r in svc.log_records()]
