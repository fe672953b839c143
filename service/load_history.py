"""``clickrank load-history``: bulk-load a GroupLens data set's ratings into Redis through ``HistoryStore``.

Every rating becomes a ``rate`` event (value = the rating) with the deterministic event id
``ml:{user}:{item}:{timestamp}``, so re-running the command stores nothing twice (within the store's
dedup window) and a run cut short can simply be repeated.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from models.data import Ratings, load_dataset
from service.bulk import bulk_store, redacted
from service.schemas.events import ContextEvent
from service.settings import Settings
from service.store import HistoryStore

CHUNK = 1000
"""Events per ``append`` call (one Lua script each)."""


@dataclass(frozen=True)
class LoadSummary:
    events: int
    users: int
    accepted: int
    duplicates: int
    seconds: float

    def line(self, target: str) -> str:
        rate = self.events / self.seconds if self.seconds > 0 else float("inf")
        return (
            f"load-history: {self.events} events of {self.users} users into {target}: {self.accepted} "
            f"stored, {self.duplicates} duplicates in {self.seconds:.1f} s ({rate:,.0f} events/s)"
        )


def rating_events(ratings: Ratings, limit: int | None = None) -> list[tuple[str, ContextEvent]]:
    """The first ``limit`` ratings (by time) as (user_id, event) pairs."""
    n = len(ratings) if limit is None else min(limit, len(ratings))
    return [
        (
            user,
            ContextEvent(
                item_id=item,
                type="rate",
                timestamp=float(ts),
                value=float(rating),
                event_id=f"ml:{user}:{item}:{ts}",
            ),
        )
        for user, item, rating, ts in zip(
            ratings.user_ids[:n].tolist(),
            ratings.item_ids[:n].tolist(),
            ratings.ratings[:n].tolist(),
            ratings.timestamps[:n].tolist(),
            strict=True,
        )
    ]


async def load_events(
    store: HistoryStore, events: list[tuple[str, ContextEvent]], *, chunk: int = CHUNK
) -> tuple[int, int]:
    """Append ``events`` in order, ``chunk`` per atomic call; returns (accepted, duplicates)."""
    accepted = duplicates = 0
    with tqdm(total=len(events), unit="ev", desc="load-history", disable=None, leave=False) as bar:
        for start in range(0, len(events), chunk):
            a, d = await store.append(events[start : start + chunk])
            accepted += a
            duplicates += d
            bar.update(a + d)
    return accepted, duplicates


async def _run(settings: Settings, events: list[tuple[str, ContextEvent]]) -> tuple[int, int]:
    async with bulk_store(settings, "re-running is safe (idempotent event ids)") as store:
        return await load_events(store, events)


def load_history_command(
    data_dir: str | Path, limit: int | None = None, *, settings: Settings | None = None
) -> LoadSummary:
    """Load the data set at ``data_dir`` (the first ``limit`` ratings by time, or all) and print a summary."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    settings = settings or Settings()
    events = rating_events(load_dataset(data_dir).ratings, limit)
    start = time.perf_counter()
    redis_log = logging.getLogger("service.redis_conn")
    level = redis_log.level
    redis_log.setLevel(logging.ERROR)  # a failure is reported once, as the command's one-line error
    try:
        accepted, duplicates = asyncio.run(_run(settings, events))
    finally:
        redis_log.setLevel(level)
    summary = LoadSummary(
        events=len(events),
        users=len({user for user, _ in events}),
        accepted=accepted,
        duplicates=duplicates,
        seconds=time.perf_counter() - start,
    )
    print(summary.line(redacted(settings.redis_url)))
    return summary
