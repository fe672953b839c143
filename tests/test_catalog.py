"""ItemCatalog: the model dir's item table, copy-on-write upserts, publish/sync through a real Redis."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import numpy as np
import pytest
import redis.asyncio

from models.model_dir import ItemTable
from service.catalog import ItemCatalog
from service.store import StoreUnavailable, connect

pytestmark = pytest.mark.anyio

DIM = 8
TRAINED = 3  # the first items have an ID-embedding offset, the others (cold at training) a zero one


@pytest.fixture()
def anyio_backend() -> str:
    return "asyncio"


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


@pytest.fixture()
async def client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    c = connect(redis_url, timeout_s=1.0)
    yield c
    await c.aclose()


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


async def test_publish_reaches_other_replicas_and_a_restart(table: ItemTable, client) -> None:
    a = ItemCatalog.from_table(table, "v1")
    b = ItemCatalog.from_table(table, "v1")
    other_model = ItemCatalog.from_table(item_table(seed=1), "v2")
    assert await b.sync(client) == 0

    await a.publish(client, [("new", "Brand new | Sci-Fi", vec(1)), ("2", "Retitled | Comedy", vec(2))])
    assert a.get("new")[0] == "Brand new | Sci-Fi"  # published items apply locally too
    assert await b.sync(client) == 2
    for item_id in ("new", "2"):
        assert b.get(item_id)[0] == a.get(item_id)[0]
        np.testing.assert_array_equal(b.get(item_id)[1], a.get(item_id)[1])
    assert await b.sync(client) == 0  # nothing new
    assert await a.sync(client) == 0  # a replica re-reading its own publication changes nothing

    await a.publish(client, [("late", "Late | Horror", vec(3))])
    assert await b.sync(client) == 1  # only what changed since the last sync
    assert len(b) == 7

    restarted = ItemCatalog.from_table(table, "v1")
    assert await restarted.sync(client) == 3
    assert_same_items(restarted, b)

    assert await other_model.sync(client) == 0  # another model version never mixes in
    assert other_model.get("new") is None and len(other_model) == 5


async def test_sync_pages_through_a_large_log_without_splitting_a_publication(
    table: ItemTable, client
) -> None:
    a = ItemCatalog.from_table(table, "v1")
    b = ItemCatalog.from_table(table, "v1")
    sizes = [1200, 1200, 2100]  # the sync chunk is 2000 rows: partial and oversized publications
    start = 0
    for size in sizes:
        await a.publish(client, [(f"n{i}", f"item {i}", vec(i)) for i in range(start, start + size)])
        start += size
    await a.publish(
        client, [("n0", "item 0 again", vec(10**6))]
    )  # re-published: moves to the newest revision
    assert await b.sync(client) == sum(sizes)
    assert len(b) == 5 + sum(sizes)
    assert b.get("n0")[0] == "item 0 again"
    assert_same_items(b, a)


async def test_sync_rereads_everything_after_redis_lost_its_data(table: ItemTable, client) -> None:
    a = ItemCatalog.from_table(table, "v1")
    b = ItemCatalog.from_table(table, "v1")
    await a.publish(client, [(f"n{i}", "x", vec(i)) for i in range(3)])
    assert await b.sync(client) == 3
    await client.flushall()  # a Redis restart without persistence: the revision starts again at 1
    await a.publish(client, [("fresh", "after the restart", vec(9))])
    assert await b.sync(client) == 1
    assert b.get("fresh")[0] == "after the restart"


async def test_catalog_calls_fail_fast_when_redis_is_down(table: ItemTable, redis_server) -> None:
    catalog = ItemCatalog.from_table(table, "v1", timeout_s=0.05)
    c = connect(redis_server.url, timeout_s=0.05)
    redis_server.stop()
    try:
        with pytest.raises(StoreUnavailable):
            await catalog.sync(c)
        with pytest.raises(StoreUnavailable):
            await catalog.publish(c, [("x", "t", vec(0))])
        assert catalog.get("x") is None  # not acknowledged, not applied
    finally:
        redis_server.start()
        await c.aclose()
