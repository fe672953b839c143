"""A Redis Cluster primary killed under event ingest (its own 3+3 cluster): the replica takes over, the
writes to its slots answer 503 meanwhile and their retries with the same event ids store each event once,
predictions answer 200 (full or ``degraded``) throughout, and with ``CLICKRANK_REDIS_WAIT_REPLICAS=1``
every acknowledged event is there afterwards (without it the loss is counted and printed)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers import app_settings, running_app

from models.redis_process import RedisClusterProcess

pytestmark = pytest.mark.anyio

NOW = time.time()
WRITERS = 6
RETRY_FOR_S = 30.0
KEY = "cr:h:{u:writer-0}"
"""writer-0's history: its primary is killed."""


@pytest.fixture()
def cluster(tmp_path: Path) -> Iterator[RedisClusterProcess]:
    with RedisClusterProcess(tmp_path / "cluster").running() as running:
        yield running


def failed_over(cluster: RedisClusterProcess, victim: int) -> bool:
    """The killed primary's replica serves its slots and the cluster says it is ok."""
    try:
        return cluster.primary_of(KEY) != victim and cluster.healthy()
    except LookupError:
        return False


@pytest.mark.parametrize("wait_replicas", [0, 1])
async def test_a_primary_killed_under_ingest(
    cluster: RedisClusterProcess, model_dir: Path, catalog: list[str], wait_replicas: int
) -> None:
    settings = app_settings(
        cluster.url,
        model_dir,
        redis_mode="cluster",
        redis_wait_replicas=wait_replicas,
        redis_timeout_ms=300.0,
        request_timeout_ms=2000.0,
    )
    victim = cluster.primary_of(KEY)
    acknowledged: dict[str, set[str]] = {}
    refused = 0
    predictions: list[tuple[int, bool | None]] = []
    writing = True
    killed_at = restarted_at = failover_s = 0.0
    last_refusal = 0.0

    async def writer(client: httpx.AsyncClient, w: int) -> None:
        nonlocal refused, last_refusal
        user = f"writer-{w}"
        for k in range(90):  # 180 events: below the 200-event history cap, all can be read back
            events = [
                {"user_id": user, "item_id": catalog[(7 * k + j) % len(catalog)], "type": "view",
                 "timestamp": NOW + k + j / 10, "event_id": f"{user}-{k}-{j}"}
                for j in range(2)
            ]  # fmt: skip
            started = time.monotonic()
            while True:  # the same batch, same ids, until acknowledged
                response = await client.post("/v1/events", json={"events": events})
                if response.status_code == 200:
                    acknowledged.setdefault(user, set()).update(e["event_id"] for e in events)
                    break
                assert response.status_code == 503, response.text
                assert "Retry-After" in response.headers
                refused += 1
                last_refusal = time.monotonic()
                if time.monotonic() - started >= RETRY_FOR_S:
                    state = await asyncio.to_thread(cluster.describe)
                    pytest.fail(f"{user}: a batch never acknowledged; the cluster:\n{state}")
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.02)

    async def reader(client: httpx.AsyncClient, r: int) -> None:
        while writing:
            body = {"user_id": f"writer-{r}", "candidates": catalog[:20]}
            response = await client.post("/v1/predict", json=body)
            predictions.append((response.status_code, response.json().get("degraded")))
            await asyncio.sleep(0.01)

    async def kill_then_restart() -> None:
        nonlocal killed_at, restarted_at, failover_s
        await asyncio.sleep(1.0)
        cluster.node(victim).kill()
        killed_at = time.monotonic()
        while not await asyncio.to_thread(failed_over, cluster, victim):
            if time.monotonic() - killed_at >= RETRY_FOR_S:
                pytest.fail(f"no failover; the cluster:\n{await asyncio.to_thread(cluster.describe)}")
            await asyncio.sleep(0.1)
        failover_s = time.monotonic() - killed_at
        await asyncio.to_thread(cluster.node(victim).start)  # it comes back as the new primary's replica
        restarted_at = time.monotonic()

    async with running_app(settings) as (client, _):

        async def writers() -> None:
            nonlocal writing
            try:
                await asyncio.gather(*(writer(client, w) for w in range(WRITERS)))
            finally:
                writing = False

        await asyncio.gather(kill_then_restart(), writers(), *(reader(client, r) for r in range(2)))
        lost = 0
        for user, ids in acknowledged.items():
            stored = (await client.get(f"/v1/users/{user}/history")).json()["events"]
            stored_ids = [e["event_id"] for e in stored]
            assert len(stored_ids) == len(set(stored_ids)), f"{user}: an event stored twice"
            lost += len(ids - set(stored_ids))

    assert killed_at > 0 and refused > 0, "the kill hit the writes"
    assert all(status == 200 for status, _ in predictions), {s for s, _ in predictions}
    degraded = sum(1 for _, flag in predictions if flag)
    total = sum(len(ids) for ids in acknowledged.values())
    print(
        f"\nWAIT {wait_replicas}: {total} events acknowledged, {lost} of them lost; {refused} refusals "
        f"(503), the last {last_refusal - killed_at:.1f} s after the kill (replica promoted at "
        f"+{failover_s:.1f} s, the old primary back as a replica at +{restarted_at - killed_at:.1f} s); "
        f"{len(predictions)} predictions all 200, {degraded} degraded"
    )
    if wait_replicas:
        assert lost == 0
