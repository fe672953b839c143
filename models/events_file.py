"""Events exported by ``clickrank export-events`` (JSON lines, the shape of ``POST /v1/events``) as
training data, alone or beside a data set's ratings.

The catalog stays the data set's (``u.item``: the encoder needs each item's text); events on other items
are dropped and counted. Beside the ratings, an exported event equal to a rating (same user, item,
``rate`` type and second) is the same event loaded into the service by ``clickrank load-history`` and is
counted once.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from models.data import DataFormatError, Dataset, Ratings
from models.features import EVENT_TYPE_IDS

RATE = EVENT_TYPE_IDS["rate"]
TYPE_NAMES = {i: name for name, i in EVENT_TYPE_IDS.items()}


@dataclass(frozen=True)
class EventsReport:
    """What was read from an events file, for the manifest and the command's summary."""

    path: str
    sha256: str
    lines: int
    used: int
    unknown_items: int
    same_as_a_rating: int
    types: dict[str, int] = field(default_factory=dict)


def read_events(path: Path, catalog: set[str]) -> tuple[Ratings, EventsReport]:
    """The file's events on ``catalog`` items, sorted by time, and what was read. A line that is not an
    event raises DataFormatError naming the line."""
    users: list[str] = []
    items: list[str] = []
    values: list[float] = []
    stamps: list[int] = []
    types: list[int] = []
    digest = hashlib.sha256()
    lines = unknown = 0
    if not path.is_file():
        raise DataFormatError(f"{path}: events file not found")
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            digest.update(raw)
            if not raw.strip():
                continue
            lines += 1
            try:
                event = json.loads(raw)
                user, item, kind = str(event["user_id"]), str(event["item_id"]), EVENT_TYPE_IDS[event["type"]]
                stamp, value = int(float(event["timestamp"])), event.get("value")
                value = float("nan") if value is None else float(value)
            except (ValueError, KeyError, TypeError) as exc:
                raise DataFormatError(f"{path}:{lineno}: not an exported event ({exc!r})") from None
            if item not in catalog:
                unknown += 1
                continue
            users.append(user)
            items.append(item)
            values.append(value)
            stamps.append(stamp)
            types.append(kind)
    if not users:
        raise DataFormatError(
            f"{path}: no event on a catalog item ({lines} lines, {unknown} on unknown items)"
        )
    ts = np.asarray(stamps, dtype=np.int64)
    order = np.lexsort((np.arange(len(ts)), ts))
    ratings = Ratings(
        user_ids=np.asarray(users, dtype=object)[order],
        item_ids=np.asarray(items, dtype=object)[order],
        ratings=np.asarray(values, dtype=np.float32)[order],
        timestamps=ts[order],
        types=np.asarray(types, dtype=np.int64)[order],
    )
    report = EventsReport(
        path=str(path),
        sha256=digest.hexdigest(),
        lines=lines,
        used=len(users),
        unknown_items=unknown,
        same_as_a_rating=0,
        types={TYPE_NAMES[t]: n for t, n in sorted(Counter(types).items())},
    )
    return ratings, report


def with_events(data: Dataset, path: Path, *, events_only: bool) -> tuple[Dataset, EventsReport]:
    """``data`` trained on the file's events: instead of its ratings (``events_only``), or beside them."""
    events, report = read_events(path, set(data.item_ids))
    if events_only:
        merged, same = events, 0
    else:
        merged, same = _merge(data.ratings, events)
    data_hash = hashlib.sha256(
        f"{'' if events_only else data.data_hash}:{report.sha256}".encode()
    ).hexdigest()
    return replace(data, ratings=merged, data_hash=data_hash), replace(report, same_as_a_rating=same)


def _merge(ratings: Ratings, events: Ratings) -> tuple[Ratings, int]:
    """Ratings plus the events that are not one of them, sorted by time; (merged, events dropped)."""
    rated = set(
        zip(ratings.user_ids.tolist(), ratings.item_ids.tolist(), ratings.timestamps.tolist(), strict=True)
    )
    keys = zip(events.user_ids.tolist(), events.item_ids.tolist(), events.timestamps.tolist(), strict=True)
    is_rate = (events.event_types() == RATE).tolist()
    new = np.array([not (rate and key in rated) for key, rate in zip(keys, is_rate, strict=True)], dtype=bool)
    columns = ("user_ids", "item_ids", "ratings", "timestamps")
    joined = {c: np.concatenate([getattr(ratings, c), getattr(events, c)[new]]) for c in columns}
    types = np.concatenate([ratings.event_types(), events.event_types()[new]])
    order = np.lexsort((np.arange(len(types)), joined["timestamps"]))
    merged = Ratings(**{c: joined[c][order] for c in columns}, types=types[order])
    return merged, int((~new).sum())
