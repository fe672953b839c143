"""User interest profiles: activity, interests, segment and representative items, from the stored history
and the serving model (``GET /v1/users/{user_id}/profile``).

- activity: counts over the stored history (the last ``HISTORY_CAP`` events);
- interests: each event's item attributes (``models.segments.item_attributes``: the genres) weighted by
  2^(-age / ``INTEREST_HALF_LIFE_S``), age measured from the user's newest event, as shares;
- segment: the user's vector (the ranker's, from the last ``HISTORY_LENGTH`` events, as served) assigned
  to the nearest of the segments found at training time (``segments.json``);
- representative items: the distinct history items with the highest retrieval logit under that vector.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from models.segments import Segments, item_attributes
from service.catalog import ItemCatalog
from service.ranking import Ranker
from service.schemas.events import StoredEvent
from service.store import HistoryStore

INTEREST_HALF_LIFE_S = 30 * 86400.0
TOP_INTERESTS = 5
TOP_ITEMS = 5


@dataclass
class Profiles:
    """Builds profiles from the store (borrowed) and one model version's parts (borrowed)."""

    store: HistoryStore
    catalog: ItemCatalog
    ranker: Ranker
    segments: Segments | None
    history_cap: int

    async def profile(self, user_id: str) -> dict[str, Any] | None:
        """The ``ProfileResponse`` fields, or None when nothing is stored about the user."""
        events, _ = await self.store.history(user_id, self.history_cap)
        if not events:
            return None
        user_vector = await self.ranker.user_vector(events)
        segment = None
        if self.segments is not None and user_vector is not None:
            j = self.segments.assign(user_vector)
            segment = {
                "id": j,
                "size": self.segments.sizes[j],
                "top_attributes": self.segments.top_attributes[j],
            }
        return {
            "user_id": user_id,
            "model_version": self.ranker.models.version,
            "activity": activity(events),
            "interests": self._interests(events),
            "segment": segment,
            "representative_items": self._representative(events, user_vector),
        }

    def _interests(self, events: list[StoredEvent]) -> list[dict[str, Any]]:
        newest = events[-1].timestamp
        weights: Counter[str] = Counter()
        texts = self.catalog.texts_of([e.item_id for e in events])
        for event, text in zip(events, texts, strict=True):
            decay = 2.0 ** (-(newest - event.timestamp) / INTEREST_HALF_LIFE_S)
            for attribute in item_attributes(text or ""):  # an item outside the catalog has none
                weights[attribute] += decay
        total = sum(weights.values())
        return [
            {"attribute": a, "weight": round(w / total, 4)} for a, w in weights.most_common(TOP_INTERESTS)
        ]

    def _representative(
        self, events: list[StoredEvent], user_vector: np.ndarray | None
    ) -> list[dict[str, Any]]:
        if user_vector is None:
            return []
        item_ids = list(dict.fromkeys(e.item_id for e in events))
        rows = self.catalog.index_of(item_ids)
        known = [(i, int(r)) for i, r in zip(item_ids, rows.tolist(), strict=True) if r >= 0]
        if not known:
            return []
        scores = self.catalog.vectors[[r for _, r in known]] @ user_vector
        best = np.argsort(-scores, kind="stable")[:TOP_ITEMS].tolist()
        texts = self.catalog.texts_of([known[b][0] for b in best])
        return [
            {"item_id": known[b][0], "text": text, "score": round(float(scores[b]), 4)}
            for b, text in zip(best, texts, strict=True)
        ]


def activity(events: list[StoredEvent]) -> dict[str, Any]:
    """Counts and dates of a time-ordered, non-empty history."""
    days = {datetime.fromtimestamp(e.timestamp, UTC).date() for e in events}
    return {
        "events": len(events),
        "by_type": dict(Counter(e.type for e in events)),
        "first_seen": events[0].timestamp,
        "last_seen": events[-1].timestamp,
        "active_days": len(days),
        "events_per_active_day": round(len(events) / len(days), 3),
    }
