"""HistoryStore on a real 3-primary, 3-replica Redis Cluster: the same answers as on a single Redis for the
same events, keys placed as ``service/redis_keys.py`` says, replica acknowledgement (WAIT), and the cached
merge of the trending shards. The API contract on the cluster: ``tests/test_api.py`` (``redis_target``);
a primary killed under ingest: ``tests/test_failover.py``."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest
import redis

from models.redis_process import RedisClusterProcess
from service.redis_conn import RedisConnection, StoreUnavailable
from service.redis_keys import AGGREGATE_SHARDS, KeyKind
from service.schemas.events import ContextEvent
from service.store import HistoryStore

pytestmark = pytest.mark.anyio

DAY = 86400.0
T0 = 1_700_000_000.0


@pytest.fixture()
async def cluster_conn(redis_cluster: RedisClusterProcess) -> AsyncIterator[RedisConnection]:
    redis_cluster.flushall()
    c = RedisConnection.connect(redis_cluster.url, timeout_s=2.0, cluster=True)
    yield c
    await c.close()


def workload(seed: int) -> list[list[tuple[str, ContextEvent]]]:
    """Batches of events of 60 users over 40 items: timestamps out of order, repeated event ids (within a
    batch and across batches), some without an id, types and values mixed."""
    rng = random.Random(seed)
    batches = []
    for b in range(30):
        batch = []
        for _ in range(rng.randint(1, 40)):
            user, item = f"user-{rng.randrange(60)}", f"item:{rng.randrange(40)}"
            kind = rng.choice(["view", "click", "add_to_cart", "purchase", "rate"])
            eid = None if rng.random() < 0.2 else f"e{rng.randrange(600)}"
            ts = T0 + b * 3600 + rng.uniform(-7200, 3600)
            value = float(rng.randint(1, 5)) if kind == "rate" else None
            batch.append(
                (user, ContextEvent(item_id=item, type=kind, timestamp=ts, value=value, event_id=eid))
            )
        batches.append(batch)
    return batches


def stores(single: RedisConnection, cluster: RedisConnection, **kwargs: float) -> list[HistoryStore]:
    settings = {"history_cap": 30, "trending_half_life_s": DAY, "covisit_size": 8, "fresh_size": 25, **kwargs}
    return [HistoryStore(single, **settings), HistoryStore(cluster, **settings)]  # type: ignore[arg-type]


async def test_the_cluster_answers_as_a_single_redis_does(
    conn: RedisConnection, cluster_conn: RedisConnection
) -> None:
    single, cluster = stores(conn, cluster_conn, merge_cache_s=0.0)
    for batch in workload(seed=7):
        assert await cluster.append(batch) == await single.append(batch)

    users = {u for batch in workload(seed=7) for u, _ in batch}
    listed = [[u async for chunk in store.users(batch=7) for u in chunk] for store in (single, cluster)]
    assert set(listed[0]) == set(listed[1]) == users
    for user in users:
        assert await cluster.history(user, 30, with_seen=True) == await single.history(
            user, 30, with_seen=True
        )

    expected, got = await single.trending(40), await cluster.trending(40)
    assert [item for item, _ in got] == [item for item, _ in expected]
    assert [score for _, score in got] == pytest.approx([score for _, score in expected], rel=1e-9)
    without = [await s.trending(5, exclude={"item:3"}) for s in (single, cluster)]
    assert [item for item, _ in without[1]] == [item for item, _ in without[0]]

    items = [f"item:{i}" for i in range(40)]
    want, have = [await s.candidate_lists(items, trending=10, exclude=3) for s in (single, cluster)]
    for mine, theirs in zip(have.covisit, want.covisit, strict=True):
        assert dict(mine) == pytest.approx(dict(theirs), rel=1e-9)
    assert set(have.fresh) == set(want.fresh) and len(have.fresh) == 25
    assert have.trending == want.trending

    await cluster.add_fresh(["new-a", "new-b"])
    await single.add_fresh(["new-a", "new-b"])
    assert set((await cluster.candidate_lists([], trending=0)).fresh) >= {"new-a", "new-b"}

    assert await cluster.forget("user-1") is True
    assert await cluster.history("user-1", 30, with_seen=True) == ([], set())
    assert await cluster.forget("user-1") is False


async def test_keys_are_placed_by_their_hash_tags(
    cluster_conn: RedisConnection, redis_cluster: RedisClusterProcess
) -> None:
    """One user's keys share a slot (so one script stores their events), even for ids with braces; the
    item aggregates are spread over every primary."""
    store = HistoryStore(cluster_conn)
    odd_users = ["plain", "}starts", "mid}dle{x}", "{tagged}"]
    events = [
        (u, ContextEvent(item_id=f"i{k}", type="click", timestamp=T0 + k))
        for u in odd_users
        for k in range(40)
    ]
    assert await store.append(events) == (len(events), 0)
    keys = store.keys
    for user in odd_users:
        slots = {
            keys.slot(keys.user(kind, user)) for kind in (KeyKind.HISTORY, KeyKind.SEEN, KeyKind.EVENT_IDS)
        }
        assert len(slots) == 1, user
        assert [e.item_id for e in (await store.history(user, 3))[0]] == ["i37", "i38", "i39"]
    assert {u async for chunk in store.users() for u in chunk} == set(odd_users)

    with redis.RedisCluster.from_url(redis_cluster.url) as client:
        shards = [key for key in keys.aggregate_shards(KeyKind.TRENDING) if client.exists(key)]
        nodes = {client.get_node_from_key(key).name for key in shards}
    assert len(shards) > AGGREGATE_SHARDS // 2 and len(nodes) == 3


async def test_the_merged_lists_are_reused_for_their_ttl_and_cleared_by_own_writes(
    redis_cluster: RedisClusterProcess, cluster_conn: RedisConnection
) -> None:
    writer, reader = HistoryStore(cluster_conn), HistoryStore(cluster_conn, merge_cache_s=0.3)
    await writer.append([("u", ContextEvent(item_id="a", type="click", timestamp=T0))])
    assert [i for i, _ in await reader.trending(3)] == ["a"]
    await writer.append(
        [("v", ContextEvent(item_id="b", type="click", timestamp=T0 + 1 + k)) for k in range(3)]
    )
    assert [i for i, _ in await reader.trending(3)] == ["a"], "another replica's writes show after the TTL"
    await asyncio.sleep(0.35)
    assert [i for i, _ in await reader.trending(3)] == ["b", "a"]
    await reader.append(
        [("w", ContextEvent(item_id="c", type="click", timestamp=T0 + 10 + k)) for k in range(5)]
    )
    assert [i for i, _ in await reader.trending(3)] == ["c", "b", "a"], "its own writes show at once"

    async def fresh() -> list[str]:
        return (await reader.candidate_lists([], trending=0)).fresh

    assert await fresh() == ["c", "b", "a"]
    await writer.add_fresh(["new-1"])
    assert await fresh() == ["c", "b", "a"], "another replica's new items show after the TTL"
    await asyncio.sleep(0.35)
    assert await fresh() == ["new-1", "c", "b", "a"]
    await reader.add_fresh(["new-2"])
    assert (await fresh())[0] == "new-2", "its own new items show at once"


async def test_events_are_acknowledged_once_the_replicas_have_them(
    redis_cluster: RedisClusterProcess,
) -> None:
    redis_cluster.flushall()
    events = [
        (f"u{k}", ContextEvent(item_id="x", type="view", timestamp=T0, event_id=f"id{k}")) for k in range(20)
    ]
    one = RedisConnection.connect(redis_cluster.url, timeout_s=2.0, cluster=True, wait_replicas=1)
    two = RedisConnection.connect(redis_cluster.url, timeout_s=1.0, cluster=True, wait_replicas=2)
    try:
        assert await HistoryStore(one).append(events[:10]) == (10, 0)
        with pytest.raises(StoreUnavailable, match="1 of 2 replicas"):  # each primary has one replica
            await HistoryStore(two).append(events[10:])
        # not acknowledged, but written on the primaries: the client's retry finds them stored once
        assert await HistoryStore(one).append(events) == (0, 20)
    finally:
        await one.close()
        await two.close()
