"""``python -m loadtests.redis_memory``: Redis bytes per stored event, by Redis configuration.

Loads the data set's events (MovieLens 100K: every rating, with its event id) into a private
redis-server through the service's own store code (``clickrank load-history``'s path), once per
configuration, and reads ``used_memory`` from ``INFO memory`` before and after. A history holds up to
``CLICKRANK_HISTORY_CAP`` (200) events, above Redis's default ``zset-max-listpack-entries`` (128): a
longer sorted set leaves the compact listpack encoding for a skiplist, so the configurations compare the
default with a listpack limit above the cap. Prints a table and writes ``report.json``/``report.md``.

    python -m loadtests.redis_memory --out /tmp/redis-memory
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

import redis

from loadtests.report import write_tables
from models.data import default_data_dir, load_dataset
from models.redis_process import RedisProcess
from service.bulk import bulk_store
from service.load_history import load_events, rating_events
from service.settings import Settings

CONFIGS = {
    "Redis default (zset-max-listpack-entries 128)": [],
    "zset-max-listpack-entries 256": ["--zset-max-listpack-entries", "256"],
}


def used_memory(url: str) -> int:
    with redis.Redis.from_url(url) as client:
        return int(client.info("memory")["used_memory"])


def measure(data_dir: Path, extra_args: list[str]) -> dict:
    with (
        tempfile.TemporaryDirectory() as tmp,
        RedisProcess(Path(tmp), extra_args=extra_args).running() as server,
    ):
        settings = Settings(redis_url=server.url)
        events = rating_events(load_dataset(data_dir).ratings)
        before = used_memory(server.url)

        async def go() -> tuple[int, int]:
            async with bulk_store(settings, "the load can be repeated") as store:
                return await load_events(store, events)

        accepted, _ = asyncio.run(go())
        after = used_memory(server.url)
    return {
        "events": accepted,
        "bytes": after - before,
        "bytes_per_event": round((after - before) / accepted, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.redis_memory", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--data-dir", type=Path, default=None, help="default: CLICKRANK_DATA_DIR")
    parser.add_argument("--out", type=Path, required=True, help="folder for report.json and report.md")
    args = parser.parse_args(argv)
    data_dir = args.data_dir or default_data_dir()
    rows = [{"config": name, **measure(data_dir, extra)} for name, extra in CONFIGS.items()]
    lines = ["| Redis configuration | events | used_memory added | bytes per event |", "|---|---|---|---|"]
    lines += [
        f"| {r['config']} | {r['events']:,} | {r['bytes'] / 2**20:.1f} MiB | {r['bytes_per_event']} |"
        for r in rows
    ]
    write_tables(args.out, rows, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
