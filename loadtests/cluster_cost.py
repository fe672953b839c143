"""What a Redis Cluster and replica acknowledgement (WAIT) cost the store, side by side in one run.

Starts a private redis-server and a private 3-primary, 3-replica Redis Cluster on loopback and drives
``HistoryStore`` directly (no HTTP): ``append`` of 10-event batches (10 users each, as a backend posts
them) with 1 and 8 calls in flight, and ``history`` (the predict path's read), on a single Redis, on the
cluster, and on the cluster with ``wait_replicas=1``. Prints a table and writes it as JSON and Markdown.

    python -m loadtests.cluster_cost --seconds 5 --out /tmp/cluster_cost
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from loadtests.report import write_tables
from models.redis_process import RedisClusterProcess, RedisProcess
from service.redis_conn import RedisConnection
from service.schemas.events import ContextEvent
from service.store import HistoryStore

BATCH = 10
USERS = 5000
ITEMS = 1682


async def _drive(store: HistoryStore, seconds: float, in_flight: int, op: str) -> dict:
    """Calls of ``op`` (``append`` or ``history``) for ``seconds`` with ``in_flight`` callers."""
    latencies: list[float] = []
    rng = np.random.default_rng(0)
    stop = time.monotonic() + seconds
    counter = 0

    async def caller() -> None:
        nonlocal counter
        while time.monotonic() < stop:
            counter += 1
            users = rng.integers(USERS, size=BATCH)
            start = time.perf_counter()
            if op == "append":
                events = [
                    (f"u{u}", ContextEvent(item_id=str(rng.integers(ITEMS)), type="view",
                                           timestamp=1.7e9 + counter, event_id=f"{counter}-{k}"))
                    for k, u in enumerate(users.tolist())
                ]  # fmt: skip
                await store.append(events)
            else:
                await store.history(f"u{users[0]}", 50, with_seen=True)
            latencies.append(time.perf_counter() - start)

    started = time.monotonic()
    await asyncio.gather(*(caller() for _ in range(in_flight)))
    elapsed = time.monotonic() - started
    ms = np.asarray(latencies) * 1000
    per_call = BATCH if op == "append" else 1
    return {
        "calls_per_s": round(len(ms) / elapsed, 1),
        "events_per_s": round(len(ms) * per_call / elapsed, 1) if op == "append" else None,
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
    }


async def _measure(single_url: str, cluster_url: str, seconds: float) -> list[dict]:
    targets = [
        ("single Redis", single_url, False, 0),
        ("3+3 cluster", cluster_url, True, 0),
        ("3+3 cluster, WAIT 1", cluster_url, True, 1),
    ]
    rows = []
    steps = [
        (t, op, n)
        for t in targets
        for op, n in (("append", 1), ("append", 8), ("history", 1), ("history", 8))
    ]
    for (name, url, cluster, wait), op, in_flight in tqdm(steps, desc="cluster cost", unit="step"):
        conn = RedisConnection.connect(url, timeout_s=2.0, cluster=cluster, wait_replicas=wait)
        try:
            result = await _drive(HistoryStore(conn), seconds, in_flight, op)
        finally:
            await conn.close()
        rows.append({"redis": name, "op": op, "in_flight": in_flight, **result})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| Redis | call | in flight | calls/s | events/s | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        events = "" if r["events_per_s"] is None else f"{r['events_per_s']:,.0f}"
        lines.append(
            f"| {r['redis']} | {r['op']} | {r['in_flight']} | {r['calls_per_s']:,.0f} | {events} "
            f"| {r['p50_ms']} | {r['p99_ms']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per step")
    parser.add_argument("--out", type=Path, required=True, help="folder for report.json and report.md")
    args = parser.parse_args(argv)
    with (
        tempfile.TemporaryDirectory(prefix="cluster-cost-") as tmp,
        RedisProcess(Path(tmp) / "single").running() as single,
        RedisClusterProcess(Path(tmp) / "cluster").running() as cluster,
    ):
        rows = asyncio.run(_measure(single.url, cluster.url, args.seconds))
    write_tables(args.out, rows, markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
