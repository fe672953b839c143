"""HistoryStore against a real redis-server: ordering, cap, idempotency, atomicity, trending,
forget, co-visitation, fresh items, deadlines and recovery after a Redis restart."""

from __future__ import annotations

import math
import random
import threading
import time

import pytest
import redis
from prometheus_client import REGISTRY
from pydantic import ValidationError

from service.redis_conn import RedisConnection, StoreUnavailable
from service.schemas.events import ContextEvent, StoredEvent
from service.store import HistoryStore

pytestmark = pytest.mark.anyio

DAY = 86400.0
T0 = 1_700_000_000.0


@pytest.fixture()
def store(conn: RedisConnection) -> HistoryStore:
    return HistoryStore(conn, history_cap=5, trending_half_life_s=DAY)


def ev(
    item: str, ts: float, kind: str = "click", value: float | None = None, eid: str | None = None
) -> ContextEvent:
    """An event record as given, not validated: the store's own refusals are tested with it."""
    return ContextEvent.model_construct(item_id=item, type=kind, timestamp=ts, value=value, event_id=eid)


def metric(name: str, op: str) -> float:
    return REGISTRY.get_sample_value(name, {"op": op}) or 0.0


def dbsize(url: str) -> int:
    with redis.Redis.from_url(url) as client:
        return client.dbsize()


# --- history ---------------------------------------------------------------------------------------------


async def test_history_is_time_ordered_newest_last_whatever_the_arrival_order(store: HistoryStore) -> None:
    batch1 = [("u", ev("c", T0 + 30, "rate", 4.0, "e3")), ("u", ev("a", T0 + 10, "view"))]
    batch2 = [("u", ev("d", T0 + 40, "purchase")), ("u", ev("b", T0 + 20, "add_to_cart", eid="e2"))]
    assert await store.append(batch1) == (2, 0)
    assert await store.append(batch2) == (2, 0)

    events, seen = await store.history("u", 10)
    assert [e.item_id for e in events] == ["a", "b", "c", "d"]
    assert seen is None
    assert events[2] == StoredEvent("c", "rate", T0 + 30, 4.0, "e3")
    assert events[1] == StoredEvent("b", "add_to_cart", T0 + 20, None, "e2")

    last_two, seen = await store.history("u", 2, with_seen=True)
    assert [e.item_id for e in last_two] == ["c", "d"]
    assert seen == {"a", "b", "c", "d"}
    assert await store.history("nobody", 10, with_seen=True) == ([], set())


async def test_identical_events_in_the_same_second_are_all_kept_in_arrival_order(store: HistoryStore) -> None:
    same = ev("x", T0)
    await store.append([("u", same), ("u", ev("y", T0)), ("u", same)])
    events, _ = await store.history("u", 10)
    assert [e.item_id for e in events] == ["x", "y", "x"]


async def test_cap_keeps_newest_events_while_the_seen_set_keeps_everything(store: HistoryStore) -> None:
    stamps = list(range(12))
    random.Random(0).shuffle(stamps)
    await store.append([("u", ev(f"i{t}", T0 + t)) for t in stamps])
    events, seen = await store.history("u", 100, with_seen=True)
    assert [e.item_id for e in events] == [f"i{t}" for t in range(7, 12)]  # cap = 5
    assert seen == {f"i{t}" for t in range(12)}

    # a late event older than everything kept is accepted (seen, trending) but trimmed at once
    assert await store.append([("u", ev("late", T0 - 100))]) == (1, 0)
    events, seen = await store.history("u", 100, with_seen=True)
    assert [e.item_id for e in events] == [f"i{t}" for t in range(7, 12)]
    assert "late" in seen


# --- idempotency and atomicity ---------------------------------------------------------------------------


async def test_a_retried_batch_is_not_stored_twice(store: HistoryStore, redis_url: str) -> None:
    batch = [("u", ev("a", T0, eid="e1")), ("u", ev("b", T0 + 1, eid="e2")), ("v", ev("a", T0, eid="e1"))]
    assert await store.append(batch) == (3, 0)  # event ids are scoped per user
    assert await store.append(batch) == (0, 3)

    mixed = [
        ("u", ev("b", T0 + 1, eid="e2")),
        ("u", ev("c", T0 + 2, eid="e3")),
        ("u", ev("c", T0 + 2, eid="e3")),
    ]
    assert await store.append(mixed) == (1, 2)  # a duplicate inside the batch is stored once

    events, _ = await store.history("u", 10)
    assert [e.event_id for e in events] == ["e1", "e2", "e3"]
    trending = dict(await store.trending(5))
    # duplicates do not count: two events of "a" at T0, seen from the latest event at T0 + 2
    assert trending["a"] == pytest.approx(2 * 2 ** (-2 / DAY), rel=1e-12)
    with redis.Redis.from_url(redis_url) as client:
        assert 0 < client.ttl("cr:e:u") <= 7 * 86400  # the dedup window is bounded


@pytest.mark.parametrize(
    "fields",
    [
        {"item_id": "b", "timestamp": math.nan},
        {"item_id": "b", "timestamp": math.inf},
        {"item_id": "", "timestamp": T0},
        {"item_id": "b", "timestamp": T0, "type": "like"},
        {"item_id": "b", "timestamp": T0, "value": math.nan},
        {"item_id": "b", "timestamp": T0, "event_id": ""},
    ],
    ids=["nan-ts", "inf-ts", "empty-item", "unknown-type", "nan-value", "empty-event-id"],
)
def test_an_invalid_event_record_cannot_be_built(fields: dict) -> None:
    """What the store stores is a validated ``ContextEvent``: no invalid one reaches it from the API or the
    loaders."""
    with pytest.raises(ValidationError):
        ContextEvent(**{"type": "click", **fields})


@pytest.mark.parametrize("ts", [math.nan, math.inf], ids=["nan-ts", "inf-ts"])
async def test_a_non_finite_timestamp_rejects_the_whole_batch_in_the_script(
    store: HistoryStore, redis_url: str, ts: float
) -> None:
    with pytest.raises(StoreUnavailable, match="event 1: timestamp is not a finite number"):
        await store.append([("u", ev("a", T0, eid="ok")), ("u", ev("b", ts))])
    assert dbsize(redis_url) == 0


async def test_a_batch_failing_inside_redis_writes_nothing(store: HistoryStore, redis_url: str) -> None:
    """The script checks everything before its first write: a foreign key of the wrong type for the second
    user's history must leave the first user, the trending set and the dedup ids untouched."""
    with redis.Redis.from_url(redis_url) as client:
        client.set("cr:h:bob", "not a sorted set")
    errors = metric("clickrank_redis_errors_total", "append")
    with pytest.raises(StoreUnavailable, match="WRONGTYPE"):
        await store.append([("alice", ev("a", T0, eid="e1")), ("bob", ev("b", T0, eid="e2"))])
    assert metric("clickrank_redis_errors_total", "append") == errors + 1
    assert dbsize(redis_url) == 1
    assert await store.append([("alice", ev("a", T0, eid="e1"))]) == (1, 0)  # e1 was never recorded


# --- trending --------------------------------------------------------------------------------------------


async def test_recent_events_beat_older_more_numerous_ones_once_decay_dominates(store: HistoryStore) -> None:
    now = T0
    await store.append(
        [("u1", ev("old", now - 10 * DAY)) for _ in range(8)]  # 8 events, 10 half-lives ago: 8/1024
        + [("u2", ev("fresh", now)) for _ in range(2)]  # 2 events now: 2
        + [("u3", ev("yesterday", now - DAY)) for _ in range(3)]  # 3 events one half-life ago: 1.5
        + [("u4", ev("busy", now - DAY)) for _ in range(10)]  # 10 events one half-life ago: 5
    )
    top = await store.trending(10)
    assert [item for item, _ in top] == ["busy", "fresh", "yesterday", "old"]
    assert [score for _, score in top] == pytest.approx([5.0, 2.0, 1.5, 8 / 1024])
    assert [item for item, _ in await store.trending(2, exclude={"busy"})] == ["fresh", "yesterday"]
    assert await store.trending(0) == []


async def test_trending_is_exact_from_1997_to_now_in_any_arrival_order(conn: RedisConnection) -> None:
    now = time.time()
    events = (
        [("u", ev("ml", 875_000_000.0 + i * 3600)) for i in range(20)]  # MovieLens era, 1997
        + [("u", ev("hot", now)), ("v", ev("hot", now - DAY)), ("w", ev("warm", now - 3 * DAY))]
        + [("u", ev("mid", 1_300_000_000.0))]
    )
    results = []
    for seed in range(3):
        order = events[:]
        random.Random(seed).shuffle(order)
        s = HistoryStore(conn, prefix=f"t{seed}:", trending_half_life_s=DAY)
        for start in range(0, len(order), 4):  # several batches, so rescaling happens between them too
            await s.append(order[start : start + 4])
        results.append(await s.trending(10))
    for top in results:
        assert [item for item, _ in top[:2]] == ["hot", "warm"]
        assert dict(top)["hot"] == pytest.approx(1.5)
        assert dict(top)["warm"] == pytest.approx(0.125)
        assert all(math.isfinite(score) and score >= 0 for _, score in top)
        assert dict(top).get("ml", 0.0) < 1e-9  # decayed to nothing, not overflowed

    # a clock far in the future counts as "now" (+1 h at most): it cannot erase the real trend
    s = HistoryStore(conn, prefix="t0:", trending_half_life_s=DAY)
    await s.append([("z", ev("skewed", 4_102_444_800.0))])  # year 2100
    top = dict(await s.trending(10))
    assert top["hot"] / top["warm"] == pytest.approx(1.5 / 0.125)
    assert top["skewed"] == pytest.approx(1.0) and top["hot"] > 1.4


# --- forget ----------------------------------------------------------------------------------------------


async def test_forget_removes_history_seen_set_and_event_ids(store: HistoryStore) -> None:
    await store.append([("u", ev("a", T0, eid="e1")), ("other", ev("a", T0))])
    assert await store.forget("u") is True
    assert await store.history("u", 10, with_seen=True) == ([], set())
    assert await store.forget("u") is False
    assert await store.append([("u", ev("a", T0, eid="e1"))]) == (1, 0)  # the id is forgotten too
    assert [e.item_id for e in (await store.history("other", 10))[0]] == ["a"]


# --- faults ----------------------------------------------------------------------------------------------


async def test_redis_down_fails_fast_and_the_client_recovers_after_restart(
    redis_url: str, redis_server
) -> None:
    c = RedisConnection.connect(redis_url, timeout_s=0.05)
    s = HistoryStore(c)
    await s.append([("u", ev("a", T0))])  # the pool now holds a connection that the restart will kill
    errors = metric("clickrank_redis_errors_total", "history")
    redis_server.stop()
    try:
        for call in (
            lambda: s.history("u", 10, with_seen=True),
            lambda: s.append([("u", ev("b", T0))]),
            c.ping,
        ):
            start = time.perf_counter()
            with pytest.raises(StoreUnavailable):
                await call()
            assert time.perf_counter() - start < 0.5
        assert metric("clickrank_redis_errors_total", "history") == errors + 1
    finally:
        redis_server.start()
    await c.ping()  # same client, no manual reconnect
    assert await s.append([("u", ev("c", T0, eid="x"))]) == (1, 0)
    assert [e.item_id for e in (await s.history("u", 10))[0]] == ["c"]  # the server lost its data

    redis_server.stop()  # a restart between two calls leaves a dead connection in the pool
    redis_server.start()
    assert await s.history("u", 10) == ([], None)  # retried on a fresh connection, no error
    await c.close()


async def test_a_slow_redis_answers_within_the_deadline(redis_url: str) -> None:
    """A real busy server (a 400 ms Lua loop from another client) must not hold a 50 ms call."""
    c = RedisConnection.connect(redis_url, timeout_s=0.05)
    s = HistoryStore(c)
    await c.ping()
    busy = (
        "local t0 = redis.call('TIME') local s = t0[1] * 1e6 + t0[2] "
        "repeat local t = redis.call('TIME') until t[1] * 1e6 + t[2] - s > 400000 return 1"
    )
    with redis.Redis.from_url(redis_url) as client:
        thread = threading.Thread(target=client.eval, args=(busy, 0))
        thread.start()
        time.sleep(0.1)
        start = time.perf_counter()
        with pytest.raises(StoreUnavailable, match="no answer within 50 ms"):
            await s.history("u", 10)
        assert time.perf_counter() - start < 0.2
        thread.join()
    assert await s.history("u", 10) == ([], None)  # the timed-out connection was replaced
    await c.close()


async def test_latency_is_recorded_by_operation(store: HistoryStore) -> None:
    before = metric("clickrank_redis_seconds_count", "history")
    await store.history("u", 5, with_seen=True)
    assert metric("clickrank_redis_seconds_count", "history") == before + 1


# --- co-visitation and fresh items -----------------------------------------------------------------------


def covisit(url: str, item: str, prefix: str = "cr:") -> dict[str, float]:
    with redis.Redis.from_url(url) as client:
        return {m.decode(): s for m, s in client.zrevrange(f"{prefix}cv:{item}", 0, -1, withscores=True)}


def redis_dump(url: str) -> dict[bytes, bytes]:
    """Every key with its serialized value: equal dumps mean nothing was written."""
    with redis.Redis.from_url(url) as client:
        return {key: client.dump(key) for key in client.keys("*")}


async def test_covisitation_weights_what_followed_what_by_recency_and_distance(
    store: HistoryStore, redis_url: str
) -> None:
    """u1: a, b, c; u2: a then b a day later. Pair weights 2^((t - ref) / half_life) / distance, with ref the
    time the source's set was created, whatever the order of the batch."""
    batch = [("u1", ev("c", T0 + 2)), ("u1", ev("a", T0)), ("u1", ev("b", T0 + 1))]  # arrival order shuffled
    await store.append(batch)
    await store.append([("u2", ev("a", T0 + 10)), ("u2", ev("b", T0 + 10 + DAY))])

    a = covisit(redis_url, "a")
    assert list(a) == ["b", "c"]  # b followed a twice (at distance 1), c once at distance 2
    assert a["b"] == pytest.approx(1 + 2 ** ((10 + DAY - 1) / DAY), rel=1e-12)  # ref = T0 + 1, b's first
    assert a["c"] == pytest.approx(2 ** (1 / DAY) / 2, rel=1e-12)
    assert covisit(redis_url, "b") == {"c": pytest.approx(1.0)}
    assert covisit(redis_url, "c") == {}  # nothing followed c

    # a later event follows the user's stored events too, and never pairs an item with itself
    await store.append([("u1", ev("a", T0 + 3)), ("u1", ev("d", T0 + 4))])
    assert set(covisit(redis_url, "a")) == {"b", "c", "d"}  # d at distance 1 after a (T0 + 3)
    assert "a" not in covisit(redis_url, "a")
    assert set(covisit(redis_url, "c")) == {"a", "d"}

    lists = await store.candidate_lists(["a", "nothing"], trending=2)
    assert [item for item, _ in lists.covisit[0]] == list(covisit(redis_url, "a"))
    assert lists.covisit[1] == []
    assert len(lists.trending) == 2


async def test_covisitation_window_and_bound(conn: RedisConnection, redis_url: str) -> None:
    s = HistoryStore(conn, trending_half_life_s=DAY, covisit_window=2, covisit_size=3)
    await s.append([("u", ev(f"w{i}", T0 + i)) for i in range(4)])
    assert set(covisit(redis_url, "w0")) == {"w1", "w2"}  # only the next W = 2 events follow w0

    # 40 users each see "hub" then one of 20 items; x0..x2 follow it more often and keep their places
    events = []
    for user in range(40):
        follower = f"x{user % 3}" if user < 30 else f"x{user}"
        events += [(f"v{user}", ev("hub", T0 + user)), (f"v{user}", ev(follower, T0 + user + 1))]
    for start in range(0, len(events), 10):  # several calls: the bound holds after each
        await s.append(events[start : start + 10])
        with redis.Redis.from_url(redis_url) as client:
            assert client.zcard("cr:cv:hub") <= 3
    assert set(covisit(redis_url, "hub")) == {"x0", "x1", "x2"}


async def test_covisitation_counts_a_retried_batch_once(store: HistoryStore, redis_url: str) -> None:
    batch = [("u", ev("a", T0, eid="e1")), ("u", ev("b", T0 + 1, eid="e2")), ("v", ev("a", T0, eid="e1"))]
    await store.append(batch)
    before = covisit(redis_url, "a")
    assert await store.append(batch) == (0, 3)
    assert await store.append([("u", ev("b", T0 + 1, eid="e2")), ("v", ev("b", T0 + 2, eid="x"))]) == (1, 1)
    assert covisit(redis_url, "a")["b"] == pytest.approx(before["b"] + 2 ** (1 / DAY), rel=1e-12)


async def test_an_invalid_batch_changes_no_covisitation_or_fresh_key(
    store: HistoryStore, redis_url: str
) -> None:
    await store.append([("u", ev("a", T0)), ("u", ev("b", T0 + 1))])
    with redis.Redis.from_url(redis_url) as client:
        client.set("cr:cv:c", "not a sorted set")  # a foreign key where the batch would write
    dump = redis_dump(redis_url)
    with pytest.raises(StoreUnavailable, match="event 1: timestamp is not a finite number"):
        await store.append([("u", ev("c", T0 + 2)), ("u", ev("d", math.nan))])
    assert redis_dump(redis_url) == dump
    # d follows c: the script finds the foreign key before its first write
    with pytest.raises(StoreUnavailable, match="WRONGTYPE"):
        await store.append([("w", ev("z", T0 + 2)), ("u", ev("c", T0 + 2)), ("u", ev("d", T0 + 3))])
    assert redis_dump(redis_url) == dump


async def test_fresh_items_are_first_events_and_new_catalog_items_bounded_to_the_newest(
    conn: RedisConnection, redis_url: str
) -> None:
    s = HistoryStore(conn, fresh_size=3)
    await s.append([("u", ev("a", T0)), ("u", ev("b", T0 + 1)), ("v", ev("a", T0 + 5))])

    def fresh() -> dict[str, float]:
        with redis.Redis.from_url(redis_url) as client:
            return {m.decode(): t for m, t in client.zrevrange("cr:fresh", 0, -1, withscores=True)}

    assert fresh() == {"b": T0 + 1, "a": T0}  # first seen: a's first event, not its latest
    before = time.time()
    await s.add_fresh(["new1", "a"])  # "a" keeps the time it was first seen
    assert fresh()["a"] == T0 and before <= fresh()["new1"] <= time.time()
    await s.append([("u", ev("new1", T0 + 9)), ("u", ev("c", T0 + 2))])  # new1 keeps its catalog time
    assert list(fresh()) == ["new1", "c", "b"]  # bounded to the newest 3: "a" left
    assert (await s.candidate_lists([], trending=0)).fresh == ["new1", "c", "b"]
    await s.append([("w", ev("a", T0 + 100))])  # "a" had an event before: it is not new again
    assert "a" not in fresh()


async def test_forget_leaves_the_anonymous_aggregates(store: HistoryStore, redis_url: str) -> None:
    await store.append([("u", ev("a", T0)), ("u", ev("b", T0 + 1))])
    assert await store.forget("u") is True
    assert set(covisit(redis_url, "a")) == {"b"}
    assert (await store.candidate_lists([], trending=5)).fresh == ["b", "a"]
    with redis.Redis.from_url(redis_url) as client:
        assert not [k for k in client.keys("*") if b"u" in k.split(b":")[-1:]]  # no key names the user


@pytest.mark.parametrize("protocol", [2, 3])
async def test_every_read_is_the_same_over_resp2_and_resp3(redis_url: str, protocol: int) -> None:
    """The scored reads (history, trending, fresh, co-visitation) parse the raw WITHSCORES reply of either
    protocol: RESP2 alternates members and score strings, RESP3 nests pairs with float scores."""
    writer = RedisConnection.connect(redis_url, timeout_s=1.0)
    reader = RedisConnection.connect(f"{redis_url}?protocol={protocol}", timeout_s=1.0)
    written = HistoryStore(writer, history_cap=5, trending_half_life_s=DAY)
    read = HistoryStore(reader, history_cap=5, trending_half_life_s=DAY)
    await written.append(
        [("u1", ev("a", T0, "rate", 4.0, "e1")), ("u1", ev("b", T0 + 1)), ("u2", ev("a", T0 + 2)),
         ("u2", ev("c", T0 + 3.5, "purchase"))]
    )  # fmt: skip
    await written.add_fresh(["new"])
    history, seen = await read.history("u1", 5, with_seen=True)
    assert [(e.item_id, e.type, e.timestamp, e.value, e.event_id) for e in history] == [
        ("a", "rate", T0, 4.0, "e1"), ("b", "click", T0 + 1, None, None)
    ]  # fmt: skip
    assert seen == {"a", "b"}
    assert await read.trending(3) == await written.trending(3)
    assert [item for item, _ in await read.trending(3)] == ["a", "c", "b"]
    lists = await read.candidate_lists(["a"], trending=3)
    assert {item for item, _ in lists.covisit[0]} == {"b", "c"}
    assert lists.covisit == (await written.candidate_lists(["a"], trending=3)).covisit
    assert all(isinstance(score, float) for _, score in lists.covisit[0])
    assert lists.fresh[0] == "new" and lists.trending == ["a", "c", "b"]
    await writer.close()
    await reader.close()
