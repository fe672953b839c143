"""ItemCatalog: the model dir's item table, upserts that never write an array handed out; CatalogSync:
publish/sync through a real Redis, under the connection's deadline."""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import numpy as np
import pytest
import redis
import redis.asyncio

from models.model_dir import ItemTable
from service.catalog import MIN_GROWTH, ItemCatalog
from service.catalog_sync import CatalogSync
from service.redis_conn import RedisConnection, StoreUnavailable
from service.settings import Settings

pytestmark = pytest.mark.anyio

DIM = 8
TRAINED = 3  # the first items have an ID-embedding offset, the others (cold at training) a zero one


def item_table(n: int = 5, seed: int = 0) -> ItemTable:
    """An item table as ``ModelDir.load`` hands it over (docs/architecture.md)."""
    rng = np.random.default_rng(seed)
    offsets = np.zeros((n, DIM), np.float32)
    offsets[:TRAINED] = rng.normal(size=(TRAINED, DIM))
    vectors = rng.normal(size=(n, DIM)).astype(np.float32) + offsets
    ids = [str(i + 1) for i in range(n)]
    return ItemTable(ids, [f"Movie {i} (1995) | Drama" for i in ids], vectors, offsets)


@pytest.fixture()
def table() -> ItemTable:
    return item_table()


def replica(conn: RedisConnection, table: ItemTable, version: str = "v1") -> CatalogSync:
    """One replica's catalog of ``version`` with its Redis sharing."""
    return CatalogSync(conn, ItemCatalog.from_table(table, version))


def assert_same_items(got: ItemCatalog, want: ItemCatalog) -> None:
    """Same ids, texts and vectors; row order is local to each replica (it follows arrival)."""
    assert sorted(got.item_ids) == sorted(want.item_ids)
    ids = want.item_ids
    np.testing.assert_array_equal(got.vectors[got.index_of(ids)], want.vectors[want.index_of(ids)])
    assert [got.get(i)[0] for i in ids] == [want.get(i)[0] for i in ids]


def vec(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=DIM).astype(np.float32)


def test_loads_the_item_table_and_maps_ids_to_rows(table: ItemTable) -> None:
    catalog = ItemCatalog.from_table(table, "v1")
    assert (len(catalog), catalog.dim, catalog.model_version) == (5, DIM, "v1")
    assert catalog.item_ids == ["1", "2", "3", "4", "5"]
    rows = catalog.index_of(["3", "nope", "1", "3"])
    assert rows.dtype == np.int64 and rows.tolist() == [2, -1, 0, 2]
    assert catalog.index_of([]).shape == (0,)
    text, vector = catalog.get("2")
    assert text == "Movie 2 (1995) | Drama"
    np.testing.assert_array_equal(vector, table.vectors[1])
    assert catalog.get("nope") is None
    assert catalog.vectors.dtype == np.float32 and catalog.vectors.shape == (5, DIM)


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ({"texts": ["t"]}, "differ in count"),
        ({"id_offsets": np.zeros((5, DIM + 1), np.float32)}, "do not match"),
        ({"vectors": np.zeros(5, np.float32)}, r"must be \[N, D\]"),
        ({"item_ids": ["1", "2", "3", "4", "1"]}, "duplicate item ids"),
    ],
    ids=["count-mismatch", "dim-mismatch", "one-dim", "duplicate-id"],
)
def test_an_inconsistent_item_table_is_a_clear_error(table: ItemTable, breakage: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"inconsistent item table: .*{message}"):
        ItemCatalog.from_table(dataclasses.replace(table, **breakage), "v1")


def test_upsert_is_copy_on_write_and_applies_id_offsets(table: ItemTable) -> None:
    catalog = ItemCatalog.from_table(table, "v1")
    offsets = table.id_offsets
    held = catalog.vectors  # what an inference thread may be reading right now
    held_copy = held.copy()
    rows_before = catalog.index_of(["1", "5"])

    catalog.upsert_local([("1", "Retitled | Comedy", vec(1)), ("new", "Brand new | Sci-Fi", vec(2))])

    np.testing.assert_array_equal(held, held_copy)  # the old array is untouched
    assert catalog.vectors is not held
    with pytest.raises(ValueError, match="read-only"):
        catalog.vectors[0, 0] = 1.0
    assert len(catalog) == 6 and catalog.item_ids[-1] == "new"
    assert catalog.index_of(["1", "5"]).tolist() == rows_before.tolist()  # rows never move
    text, vector = catalog.get("1")
    assert text == "Retitled | Comedy"
    np.testing.assert_allclose(vector, vec(1) + offsets[0])  # a trained item keeps its ID embedding
    np.testing.assert_array_equal(catalog.get("new")[1], vec(2))  # a new item is its text vector
    catalog.upsert_local([("new", "Brand new | Sci-Fi", vec(3))])
    np.testing.assert_array_equal(catalog.get("new")[1], vec(3))  # a new item has a zero offset


def test_appends_write_past_every_handed_out_array_and_copy_only_to_grow(table: ItemTable) -> None:
    """New items cost O(their number): they go into the buffer's headroom, past the rows of any vectors
    array already handed out, which share it and stay as they were; the rows are copied only when the
    headroom is full (once every size / HEADROOM appends), or for an update of a known item's vector."""
    catalog = ItemCatalog.from_table(table, "v1")
    held = [catalog.vectors]
    for k in range(MIN_GROWTH):  # fills the headroom of a 5-item table exactly
        catalog.upsert_local([(f"new-{k}", f"New {k} | Drama", vec(k))])
        assert np.shares_memory(catalog.vectors, held[0])  # appended in place, nothing copied
        if k % 250 == 0:
            held.append(catalog.vectors)
    held_copies = [h.copy() for h in held]
    assert len(catalog) == 5 + MIN_GROWTH and catalog.index_of(["new-0"]).tolist() == [5]
    catalog.upsert_local([("one-more", "Over | Drama", vec(0))])  # the buffer is full: it grows, once
    grown = catalog.vectors
    assert not np.shares_memory(grown, held[0]) and len(grown) == 5 + MIN_GROWTH + 1
    catalog.upsert_local([("and-another", "Over | Drama", vec(1))])
    assert np.shares_memory(catalog.vectors, grown)
    for h, copy in zip(held, held_copies, strict=True):  # every array handed out is as it was
        np.testing.assert_array_equal(h, copy)
        assert not h.flags.writeable
    np.testing.assert_array_equal(catalog.vectors[: len(held[-1])], held[-1])
    for k in (0, 500, MIN_GROWTH - 1):
        text, vector = catalog.get(f"new-{k}")
        assert text == f"New {k} | Drama" and catalog.item_ids[5 + k] == f"new-{k}"
        np.testing.assert_array_equal(vector, vec(k))

    before = catalog.vectors
    catalog.upsert_local([("new-3", "New 3 | Drama", vec(99))])  # a known item's vector: copy-on-write
    assert not np.shares_memory(catalog.vectors, before)
    np.testing.assert_array_equal(before[8], vec(3))
    np.testing.assert_array_equal(catalog.get("new-3")[1], vec(99))
    assert catalog.changes_since(0).updated.tolist() == [8]
    catalog.upsert_local([("new-4", "Retitled | Comedy", vec(4))])  # a new text alone: no copy
    assert catalog.get("new-4")[0] == "Retitled | Comedy"
    assert catalog.changes_since(0).updated.tolist() == [8]


def test_an_upsert_with_an_id_twice_keeps_its_last_entry(table: ItemTable) -> None:
    catalog = ItemCatalog.from_table(table, "v1")
    changed = catalog.upsert_local(
        [
            ("new", "First | Drama", vec(1)),
            ("2", "Retitled | Comedy", vec(2)),
            ("new", "Second | Drama", vec(3)),
            ("2", table.texts[1], table.vectors[1] - table.id_offsets[1]),  # "2" back as it was
        ]
    )
    assert changed == 1 and len(catalog) == 6
    assert catalog.get("new")[0] == "Second | Drama"
    np.testing.assert_array_equal(catalog.get("new")[1], vec(3))
    assert catalog.get("2")[0] == table.texts[1]
    np.testing.assert_array_equal(catalog.get("2")[1], table.vectors[1])


@pytest.mark.parametrize(
    "bad",
    [("x", "t", np.zeros(DIM + 1)), ("x", "t", np.full(DIM, np.nan)), ("", "t", np.zeros(DIM))],
    ids=["wrong-dim", "nan", "empty-id"],
)
def test_an_invalid_upsert_changes_nothing(table: ItemTable, bad: tuple) -> None:
    catalog = ItemCatalog.from_table(table, "v1")
    before = catalog.vectors
    with pytest.raises(ValueError, match="item 1"):
        catalog.upsert_local([("2", "fine", vec(0)), bad])
    assert catalog.vectors is before and len(catalog) == 5
    assert catalog.get("2")[0] == "Movie 2 (1995) | Drama"


async def test_publish_reaches_other_replicas_and_a_restart(table: ItemTable, conn: RedisConnection) -> None:
    a, b = replica(conn, table), replica(conn, table)
    other_model = replica(conn, item_table(seed=1), "v2")
    assert await b.sync() == 0

    await a.publish([("new", "Brand new | Sci-Fi", vec(1)), ("2", "Retitled | Comedy", vec(2))])
    assert a.catalog.get("new")[0] == "Brand new | Sci-Fi"  # published items apply locally too
    assert await b.sync() == 2
    for item_id in ("new", "2"):
        assert b.catalog.get(item_id)[0] == a.catalog.get(item_id)[0]
        np.testing.assert_array_equal(b.catalog.get(item_id)[1], a.catalog.get(item_id)[1])
    assert await b.sync() == 0  # nothing new
    assert await a.sync() == 0  # a replica re-reading its own publication changes nothing

    await a.publish([("late", "Late | Horror", vec(3))])
    assert await b.sync() == 1  # only what changed since the last sync
    assert len(b.catalog) == 7

    restarted = replica(conn, table)
    assert await restarted.sync() == 3
    assert_same_items(restarted.catalog, b.catalog)

    assert await other_model.sync() == 0  # another model version never mixes in
    assert other_model.catalog.get("new") is None and len(other_model.catalog) == 5


async def test_sync_pages_through_a_large_log_without_splitting_a_publication(
    table: ItemTable, conn: RedisConnection
) -> None:
    a, b = replica(conn, table), replica(conn, table)
    sizes = [1200, 1200, 2100]  # the sync chunk is 2000 rows: partial and oversized publications
    start = 0
    for size in sizes:
        await a.publish([(f"n{i}", f"item {i}", vec(i)) for i in range(start, start + size)])
        start += size
    await a.publish([("n0", "item 0 again", vec(10**6))])  # re-published: moves to the newest revision
    assert await b.sync() == sum(sizes)
    assert len(b.catalog) == 5 + sum(sizes)
    assert b.catalog.get("n0")[0] == "item 0 again"
    assert_same_items(b.catalog, a.catalog)


async def test_sync_rereads_everything_after_redis_lost_its_data(
    table: ItemTable, conn: RedisConnection, redis_url: str
) -> None:
    a, b = replica(conn, table), replica(conn, table)
    await a.publish([(f"n{i}", "x", vec(i)) for i in range(3)])
    assert await b.sync() == 3
    with redis.Redis.from_url(redis_url) as client:
        client.flushall()  # a Redis restart without persistence: the revision starts again at 1
    await a.publish([("fresh", "after the restart", vec(9))])
    assert await b.sync() == 1
    assert b.catalog.get("fresh")[0] == "after the restart"


def command_calls(redis_url: str, command: str) -> int:
    """How many times the server ran ``command`` (INFO commandstats, e.g. ``evalsha``, ``script|load``)."""
    with redis.Redis.from_url(redis_url) as client:
        return int(client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


async def test_the_publish_script_is_loaded_once_and_run_by_its_sha(
    table: ItemTable, conn: RedisConnection, redis_url: str
) -> None:
    """Loaded into the server once (INFO commandstats), then one EVALSHA per publication; loaded again
    once when the server forgot it."""
    a, b = replica(conn, table), replica(conn, table)  # two catalogs sharing one connection
    with redis.Redis.from_url(redis_url) as client:
        client.script_flush()  # earlier tests loaded it into this server
        client.config_resetstat()
    for i in range(3):
        await a.publish([(f"a{i}", "x", vec(i))])
        await b.publish([(f"b{i}", "x", vec(i))])
    assert command_calls(redis_url, "script|load") == 1  # after the first EVALSHA answered NOSCRIPT
    assert command_calls(redis_url, "evalsha") == 6 + 1
    assert command_calls(redis_url, "eval") == 0  # never the whole source per call

    with redis.Redis.from_url(redis_url) as client:
        client.script_flush()  # the server forgot it (a restart): loaded again once, transparently
    await a.publish([("c", "x", vec(0))])
    await b.publish([("d", "x", vec(0))])
    assert command_calls(redis_url, "script|load") == 2
    assert await replica(conn, table).sync() == 8


async def test_catalog_calls_fail_fast_when_redis_is_down(table: ItemTable, redis_server) -> None:
    conn = RedisConnection.connect(redis_server.url, timeout_s=0.05)
    sharing = replica(conn, table)
    redis_server.stop()
    try:
        with pytest.raises(StoreUnavailable):
            await sharing.sync()
        with pytest.raises(StoreUnavailable):
            await sharing.publish([("x", "t", vec(0))])
        assert sharing.catalog.get("x") is None  # not acknowledged, not applied
    finally:
        redis_server.start()
        await conn.close()


async def test_catalog_calls_obey_the_configured_redis_timeout(table: ItemTable, redis_server) -> None:
    """A Redis that accepts connections but does not answer (SIGSTOP): each call gives up at
    ``redis_timeout_ms``, not later."""
    settings = Settings(redis_url=redis_server.url, redis_timeout_ms=80)
    conn = RedisConnection.from_settings(settings)
    sharing = replica(conn, table)
    assert await sharing.sync() == 0  # connected: the pool holds a live connection
    os.kill(redis_server.pid, signal.SIGSTOP)
    try:
        for call in (sharing.sync, lambda: sharing.publish([("x", "t", vec(0))])):
            start = time.perf_counter()
            with pytest.raises(StoreUnavailable, match="no answer within 80 ms"):
                await call()
            assert 0.08 <= time.perf_counter() - start < 0.5  # the old catalog waited a fixed 1 s
        assert sharing.catalog.get("x") is None
    finally:
        os.kill(redis_server.pid, signal.SIGCONT)
    assert await sharing.sync() in (0, 1)  # answering again; the cut-off publish may have landed
    await conn.close()
