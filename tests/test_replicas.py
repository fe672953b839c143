"""Two replicas (real ``clickrank serve`` processes) sharing one real redis-server or one real 3+3 Redis
Cluster (``redis_target``), behind a small
round-robin TCP proxy on loopback: an event posted through one is in the other's very next prediction, an
item added through one is ranked by the other within the sync interval, and with one replica killed under
load the other keeps answering and no acknowledged event is lost (retries reuse their event ids)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from conftest import RedisTarget
from served import Service

from models.redis_process import free_port

NOW = time.time()
SYNC_S = 0.2
BATCHES = 50
"""Batches of 3 events per writer: 150 events, below the 200-event history cap, so all can be read back."""


@contextlib.asynccontextmanager
async def round_robin_proxy(backends: list[int]) -> AsyncIterator[int]:
    """A TCP proxy on a free loopback port: each new connection goes to the next backend port, or to the
    one after it when that one refuses (a dead replica). Yields the proxy's port."""
    turn = itertools.cycle(range(len(backends)))

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        first = next(turn)
        for k in range(len(backends)):
            try:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", backends[(first + k) % len(backends)]
                )
                break
            except OSError:
                continue
        else:
            client_writer.close()
            return
        await asyncio.gather(pipe(client_reader, writer), pipe(reader, client_writer))

    port = free_port()
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    try:
        yield port
    finally:
        server.close()


def replica(tmp_path: Path, name: str, redis: RedisTarget, model_dir: Path) -> Service:
    workdir = tmp_path / name
    workdir.mkdir()
    svc = Service(
        workdir,
        {
            "redis_url": redis.url,
            "redis_mode": redis.mode,
            "model_dir": str(model_dir),
            "device": "cpu",
            "intra_op_threads": "1",
            "redis_timeout_ms": "250",
            "shed_loop_lag_ms": "0",
            "item_sync_interval_s": str(SYNC_S),
        },
    )
    svc.start()
    return svc


def test_two_replicas_share_state_and_survive_one_killed_under_load(
    tmp_path: Path, empty_redis: RedisTarget, model_dir: Path, catalog: list[str]
) -> None:
    a, b = replica(tmp_path, "a", empty_redis, model_dir), replica(tmp_path, "b", empty_redis, model_dir)
    try:
        asyncio.run(_scenario(a, b, catalog))
    finally:
        a.stop()
        b.stop()


async def _scenario(a: Service, b: Service, catalog: list[str]) -> None:
    async with httpx.AsyncClient(timeout=10.0) as http:
        # an event through A is in B's very next prediction
        for n in range(1, 4):
            event = {"user_id": "cross", "item_id": catalog[n], "type": "click", "timestamp": NOW + n}
            assert (await http.post(f"{a.url}/v1/events", json={"events": [event]})).status_code == 200
            answer = (
                await http.post(f"{b.url}/v1/predict", json={"user_id": "cross", "candidates": catalog[:5]})
            ).json()
            assert answer["history_length"] == n
        # an item added through A is ranked by B within the sync interval
        item = {"item_id": "replicated-item", "text": "Two Replicas (2030) | Drama"}
        assert (await http.post(f"{a.url}/v1/items", json={"items": [item]})).status_code == 200
        added = time.monotonic()
        while (await http.get(f"{b.url}/v1/items/replicated-item")).status_code != 200:
            assert time.monotonic() - added < SYNC_S + 2.0, "B did not pick the item up"
            await asyncio.sleep(0.02)
        answer = (
            await http.post(f"{b.url}/v1/predict", json={"user_id": "x", "candidates": [item["item_id"]]})
        ).json()
        assert answer["unknown_items"] == [] and answer["predictions"][0]["item_id"] == item["item_id"]

    async with round_robin_proxy([a.port, b.port]) as port:
        await _kill_one_under_load(f"http://127.0.0.1:{port}", a, b, catalog)


async def _kill_one_under_load(url: str, a: Service, b: Service, catalog: list[str]) -> None:
    """Writers post batches with event ids through the proxy (a batch whose answer is lost is retried with
    the same ids); readers predict until the writers are done. A is killed a second in."""
    acknowledged: dict[str, set[str]] = {}
    predict_status: list[tuple[float, int]] = []
    writing = True
    killed_at = 0.0

    async def writer(w: int, http: httpx.AsyncClient) -> None:
        user = f"w{w}"
        for k in range(BATCHES):
            await asyncio.sleep(0.05)
            events = [
                {"user_id": user, "item_id": catalog[(k * 3 + j) % len(catalog)], "type": "view",
                 "timestamp": NOW + k + j / 10, "event_id": f"{user}-{k}-{j}"}
                for j in range(3)
            ]  # fmt: skip
            for _ in range(20):  # retry the same batch until it is acknowledged
                try:
                    response = await http.post(f"{url}/v1/events", json={"events": events})
                except httpx.TransportError:
                    continue
                if response.status_code == 200:
                    acknowledged.setdefault(user, set()).update(e["event_id"] for e in events)
                    break
            else:
                raise AssertionError(f"batch {user}-{k} never acknowledged")

    async def reader(r: int, http: httpx.AsyncClient) -> None:
        while writing:
            try:
                response = await http.post(
                    f"{url}/v1/predict", json={"user_id": f"w{r}", "candidates": catalog[:20]}
                )
                predict_status.append((time.monotonic(), response.status_code))
            except httpx.TransportError:
                predict_status.append((time.monotonic(), 0))  # the connection to the killed replica

    async def kill() -> None:
        nonlocal killed_at
        await asyncio.sleep(1.0)
        a.signal(signal.SIGKILL)
        killed_at = time.monotonic()

    # no keep-alive: every request is a new connection, so the proxy alternates replicas per request
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=10.0, limits=limits) as http:

        async def writers() -> None:
            nonlocal writing
            await asyncio.gather(*(writer(w, http) for w in range(3)))
            writing = False

        await asyncio.gather(kill(), writers(), *(reader(r, http) for r in range(2)))
        after_kill = [s for t, s in predict_status if t > killed_at + 0.5]
        assert after_kill and all(s == 200 for s in after_kill), "B kept answering through the proxy"
        assert all(s in (200, 0) for _, s in predict_status), "no error answer, only the killed connections"
        for user, ids in acknowledged.items():
            stored = (await http.get(f"{b.url}/v1/users/{user}/history")).json()["events"]
            stored_ids = [e["event_id"] for e in stored]
            assert ids <= set(stored_ids), f"{user}: acknowledged events lost"
            assert len(stored_ids) == len(set(stored_ids)), f"{user}: an event stored twice"
    lost_connections = sum(1 for _, s in predict_status if s == 0)
    total = sum(len(i) for i in acknowledged.values())
    print(
        f"\nreplica killed under load: {total} acknowledged events all stored once; {len(after_kill)} "
        f"predictions after the kill all 200 ({lost_connections} connections to the killed one dropped)"
    )
