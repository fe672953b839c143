"""models.covisit: the harness's co-visitation sets match what the service stores in Redis for the same
events, and the served scorer ranks by log click_probability + β × co-visitation score."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from models.calibration import Calibration
from models.covisit import CovisitTable, served_scorer
from models.sequences import UserSequence
from service.redis_conn import RedisConnection
from service.schemas.events import ContextEvent
from service.store import HistoryStore

DAY = 86400.0
T0 = 1_700_000_000.0


def sequence(user: str, items: list[int], days: list[float]) -> UserSequence:
    return UserSequence(
        user,
        np.array(items, dtype=np.int64),
        np.zeros(len(items), dtype=np.int64),
        T0 + DAY * np.array(days, dtype=np.float64),
    )


SEQUENCES = [
    sequence("u1", [0, 1, 2, 1, 3], [0, 0.5, 1, 2, 3]),
    sequence("u2", [0, 2, 4], [1, 1.5, 4]),
    sequence("u3", [3, 0, 1, 4, 2, 0], [0, 1, 2, 3, 3.5, 5]),
]


async def stored_sets(redis_url: str, num_items: int) -> list[dict[int, float]]:
    """The same events through the service's store: each co-visitation set, normalised to sum 1."""
    conn = RedisConnection.connect(redis_url, timeout_s=1.0)
    store = HistoryStore(conn, trending_half_life_s=3 * DAY, covisit_window=5, covisit_size=50)
    for seq in SEQUENCES:
        await store.append(
            [(seq.user_id, ContextEvent(item_id=str(i), type="rate", timestamp=float(t), value=4.0))
             for i, t in zip(seq.items.tolist(), seq.timestamps.tolist(), strict=True)]
        )  # fmt: skip
    lists = await store.candidate_lists([str(i) for i in range(num_items)], trending=0)
    await conn.close()
    out = []
    for entries in lists.covisit:
        total = sum(score for _, score in entries)
        out.append({int(item): score / total for item, score in entries})
    return out


def test_the_sets_match_the_services_redis_sets(redis_url: str) -> None:
    num_items = 5
    table = CovisitTable.from_sequences(SEQUENCES, num_items, window=5, size=50, half_life_s=3 * DAY)
    stored = asyncio.run(stored_sets(redis_url, num_items))
    for source in range(num_items):
        rows, weights = table.followers[source]
        assert dict(zip(rows.tolist(), weights.tolist(), strict=True)) == pytest.approx(stored[source])
    assert 0 not in table.followers[0][0]  # never an item after itself


def test_scores_weight_the_kth_latest_source_1_over_k_and_the_scorer_adds_them() -> None:
    table = CovisitTable.from_sequences(SEQUENCES, 5, window=5, size=50, half_life_s=3 * DAY, sources=2)
    history = sequence("h", [4, 2, 2, 0], [0, 1, 2, 3])  # latest distinct: 0, then 2 (4 is third: unused)
    expected = np.zeros(5)
    for k, source in enumerate((0, 2), start=1):
        rows, weights = table.followers[source]
        expected[rows] += weights / k
    assert table.scores(history, 5) == pytest.approx(expected)

    logits = np.array([[0.0, 1.0, 2.0, 3.0, 4.0]])
    scorer = served_scorer(lambda h: (logits, logits), table, Calibration(), 8.0, 5)
    z = logits - np.log(np.exp(logits).sum())
    log_p = np.log(1.0 / (1.0 + np.exp(-z)))
    assert scorer([history])[0] == pytest.approx(log_p[0] + 8.0 * expected)
