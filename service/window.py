"""A request's history as the ranker reads it: stored and context events merged, cut to the catalog's items
and the model's length, turned into features."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from models.features import event_type_ids, gap_buckets, value_buckets
from service.catalog import ItemCatalog
from service.runtime import History, RankRequest
from service.schemas.events import EventRecord


def merge_events(stored: Sequence[EventRecord], context: Sequence[EventRecord]) -> list[EventRecord]:
    """Stored events plus the request's context events, ordered by timestamp, newest last.

    A context event whose ``event_id`` is already stored is the same event sent twice and is skipped.
    The sort is stable: at equal timestamps stored events come before context events.
    """
    if not context:
        return list(stored)  # the store returns its events time-ordered already
    stored_ids = {e.event_id for e in stored if e.event_id is not None}
    extra = [c for c in context if c.event_id is None or c.event_id not in stored_ids]
    return sorted([*stored, *extra], key=lambda e: e.timestamp)


@dataclass(frozen=True, slots=True)
class Window:
    """The history the ranker reads for one request: catalog items only, oldest first."""

    item_ids: list[str]
    history: History

    def __len__(self) -> int:
        return len(self.item_ids)

    def request(self, candidate_vectors: np.ndarray) -> RankRequest:
        return RankRequest(self.history, np.ascontiguousarray(candidate_vectors, dtype=np.float32))


def build_window(events: Sequence[EventRecord], catalog: ItemCatalog, length: int) -> Window:
    """The last ``length`` events (time-ordered) whose item is in the catalog, as ranker features.

    Unknown items are dropped before the cut, so the ranker always gets up to ``length`` real events.
    Gaps are computed over the kept events, as in training.
    """
    rows = catalog.index_of([e.item_id for e in events]) if events else np.empty(0, dtype=np.int64)
    keep = np.flatnonzero(rows >= 0)[-length:] if length > 0 else np.empty(0, dtype=np.int64)
    kept = [events[i] for i in keep.tolist()]
    history = History(
        vectors=catalog.vectors.take(rows[keep], axis=0),  # a new C-contiguous float32 array
        types=event_type_ids([e.type for e in kept]),
        values=value_buckets([e.value for e in kept]),
        gaps=gap_buckets([e.timestamp for e in kept]),
    )
    return Window(item_ids=[e.item_id for e in kept], history=history)
