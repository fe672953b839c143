"""``clickrank export-events``: every stored event of every user, from Redis to a JSON-lines file.

One line per event, the shape ``POST /v1/events`` takes (so a file can be replayed into a service as it
is), users in ``SCAN`` order and each user's events oldest first::

    {"user_id": "196", "item_id": "242", "type": "rate", "timestamp": 881250949.0, "value": 3.0,
     "event_id": "ml:196:242:881250949"}        (one line in the file)

``value`` and ``event_id`` appear only when the event has them. What is exported is what the store keeps:
each user's last ``CLICKRANK_HISTORY_CAP`` events. The file is written to ``OUT.partial`` and renamed at
the end, so an interrupted export never leaves a truncated file under the requested name.
``clickrank train --events FILE`` reads it (``models/events_file.py``).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from service.bulk import bulk_store
from service.schemas.events import StoredEvent
from service.settings import Settings
from service.store import HistoryStore


@dataclass(frozen=True)
class ExportSummary:
    users: int
    events: int
    seconds: float

    def line(self, out: Path) -> str:
        rate = self.events / self.seconds if self.seconds > 0 else float("inf")
        return (
            f"export-events: {self.events} events of {self.users} users to {out} in {self.seconds:.1f} s "
            f"({rate:,.0f} events/s)"
        )


def event_line(user_id: str, event: StoredEvent) -> str:
    """One exported line."""
    fields = {"user_id": user_id, **{k: v for k, v in event._asdict().items() if v is not None}}
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=False)


async def export(store: HistoryStore, history_cap: int, out: Path) -> tuple[int, int]:
    """Write every stored event to ``out`` (via ``out.partial``); returns (users, events)."""
    partial = out.with_name(out.name + ".partial")
    done: set[str] = set()  # SCAN may list a key twice
    events = 0
    progress = tqdm(unit="user", desc="export-events", disable=None)
    with partial.open("w", encoding="utf-8") as fh, progress as bar:
        async for users in store.users():
            for user_id in users:
                if user_id in done:
                    continue
                done.add(user_id)
                stored, _ = await store.history(user_id, history_cap)
                fh.writelines(event_line(user_id, e) + "\n" for e in stored)
                events += len(stored)
                bar.update(1)
                bar.set_postfix(events=events, refresh=False)
    partial.replace(out)
    return len(done), events


async def _run(settings: Settings, out: Path) -> tuple[int, int]:
    async with bulk_store(settings, "run the export again") as store:
        return await export(store, settings.history_cap, out)


def export_events_command(out: str | Path, *, settings: Settings | None = None) -> ExportSummary:
    """Export the store that the settings name to ``out`` and print a summary."""
    out = Path(out)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out.parent}: directory not found")
    settings = settings or Settings()
    started = time.perf_counter()
    users, events = asyncio.run(_run(settings, out))
    summary = ExportSummary(users=users, events=events, seconds=time.perf_counter() - started)
    print(summary.line(out))
    return summary
