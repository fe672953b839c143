"""/v1/recommend's candidate sources through real HTTP (ASGI), a real redis-server and a real exported model:
co-visitation, fresh items, their metrics and a failing source read. Pure merge logic at the end.

The app here retrieves a single item by vector similarity and reads no trending items, so whatever else a
recommend answer holds came from co-visitation or the fresh items."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from fastapi import FastAPI
from helpers import app_settings, running_app, scraped_metric
from oracle import ModelFiles

from service.candidates import Covisitation, FollowerCache, Followers, last_distinct
from service.settings import Settings

pytestmark = pytest.mark.anyio

NOW = time.time()


def narrow_settings(redis_url: str, model_dir: Path, **overrides: Any) -> Settings:
    """One retrieved item, no trending items, the three newest fresh items."""
    narrow = {"retrieval_size": 1, "trending_candidates": 0, "fresh_size": 3, "fresh_candidates": 3}
    return app_settings(redis_url, model_dir, **narrow, **overrides)


@pytest.fixture(scope="module")
async def narrow(redis_server: Any, model_dir: Path) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    async with running_app(narrow_settings(redis_server.url, model_dir)) as handle:
        yield handle


@pytest.fixture()
def client(narrow: tuple[httpx.AsyncClient, FastAPI], redis_url: str) -> httpx.AsyncClient:
    return narrow[0]


def event(user: str, item: str, ts: float) -> dict[str, Any]:
    return {"user_id": user, "item_id": item, "type": "click", "timestamp": ts}


async def post_events(client: httpx.AsyncClient, events: list[dict[str, Any]]) -> None:
    response = await client.post("/v1/events", json={"events": events})
    assert response.status_code == 200, response.text


async def recommend(client: httpx.AsyncClient, user: str, top_k: int = 100) -> dict[str, Any]:
    response = await client.post("/v1/recommend", json={"user_id": user, "top_k": top_k})
    assert response.status_code == 200, response.text
    return response.json()


async def history_user(client: httpx.AsyncClient, user: str, items: list[str]) -> None:
    """The user's events, a minute apart and ending a minute ago: the newest first-seen items, so the
    (bounded) fresh set holds only items this user has seen."""
    await post_events(
        client, [event(user, item, NOW - 60 * (len(items) - i)) for i, item in enumerate(items)]
    )


async def test_a_strongly_covisited_item_joins_a_tiny_retrieval(
    client: httpx.AsyncClient, redis_url: str, catalog: list[str]
) -> None:
    seen = catalog[100:104]
    last = seen[-1]
    await history_user(client, "me", seen)
    alone = await recommend(client, "me")
    assert len(alone["items"]) == 1 and alone["degraded"] is False  # vector retrieval's single item
    retrieved = alone["items"][0]["item_id"]
    target = next(item for item in catalog[200:] if item != retrieved)

    # other users went from the user's last item to the target, long ago (so the target is not fresh)
    fans = [(event(f"fan{u}", last, NOW - 5000), event(f"fan{u}", target, NOW - 4990)) for u in range(3)]
    await post_events(client, [e for pair in fans for e in pair])
    with redis.Redis.from_url(redis_url) as r:
        assert r.zrevrange(f"cr:cv:{last}", 0, -1) == [target.encode()]
        assert target.encode() not in r.zrange("cr:fresh", 0, -1)
    sources = ("covisit", "retrieval", "union")

    async def candidates() -> dict[str, float]:
        return {s: await scraped_metric(client, "clickrank_candidates_sum", source=s) for s in sources}

    before = await candidates()
    body = await recommend(client, "me")
    after = await candidates()
    assert {i["item_id"] for i in body["items"]} == {retrieved, target}
    assert body["degraded"] is False
    assert {s: after[s] - before[s] for s in sources} == {"covisit": 1, "retrieval": 1, "union": 2}

    with redis.Redis.from_url(redis_url) as r:
        r.delete(f"cr:cv:{last}")
    assert [i["item_id"] for i in (await recommend(client, "me"))["items"]] == [retrieved]


async def test_an_item_upserted_a_moment_ago_is_recommended_to_a_user_with_history(
    narrow: tuple[httpx.AsyncClient, FastAPI], redis_url: str, catalog: list[str]
) -> None:
    client = narrow[0]
    await history_user(client, "me2", catalog[300:304])
    before = await recommend(client, "me2")
    assert len(before["items"]) == 1

    item_id = f"fresh:{time.time_ns()}"  # new to this module's catalog, whatever ran before
    upsert = {"items": [{"item_id": item_id, "text": "Brand New Film (2026) | Drama, Thriller"}]}
    assert (await client.post("/v1/items", json=upsert)).json() == {"upserted": 1}
    assert narrow[1].state.services.model.catalog.index_of([item_id])[0] >= 0

    after = await recommend(client, "me2")
    assert {i["item_id"] for i in after["items"]} == {before["items"][0]["item_id"], item_id}
    # updating a known item does not make it fresh again
    with redis.Redis.from_url(redis_url) as r:
        r.zrem("cr:fresh", item_id)
    assert (await client.post("/v1/items", json=upsert)).status_code == 200
    assert [i["item_id"] for i in (await recommend(client, "me2"))["items"]] == [
        before["items"][0]["item_id"]
    ]


async def test_a_failing_source_read_answers_degraded_not_500(
    client: httpx.AsyncClient, redis_url: str, catalog: list[str]
) -> None:
    """The history read succeeds, the co-visitation read fails (a foreign value where the user's last
    item's set belongs): the answer comes from vector retrieval alone and says ``degraded``."""
    seen = catalog[400:404]
    await history_user(client, "broken", seen)
    with redis.Redis.from_url(redis_url) as r:
        r.set(f"cr:cv:{seen[-1]}", "not a sorted set")
    degraded_before = await scraped_metric(client, "clickrank_degraded_total", route="/v1/recommend")
    response = await client.post("/v1/recommend", json={"user_id": "broken", "top_k": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["degraded"] is True and body["history_length"] == len(seen)
    assert len(body["items"]) == 1 and body["items"][0]["item_id"] not in seen
    degraded = await scraped_metric(client, "clickrank_degraded_total", route="/v1/recommend")
    assert degraded == degraded_before + 1


async def test_forget_keeps_working_and_leaves_the_aggregates(
    client: httpx.AsyncClient, redis_url: str, catalog: list[str]
) -> None:
    await history_user(client, "gone", catalog[500:503])
    response = await client.delete("/v1/users/gone")
    assert response.status_code == 200 and response.json()["forgotten"] is True
    with redis.Redis.from_url(redis_url) as r:
        assert not [k for k in r.keys("*") if k.endswith(b":gone")]
        assert r.zrevrange(f"cr:cv:{catalog[500]}", 0, -1) == [catalog[501].encode(), catalog[502].encode()]


async def test_a_cached_covisitation_set_is_reused_for_its_ttl_then_read_again(
    redis_server: Any, redis_url: str, model_dir: Path, catalog: list[str]
) -> None:
    """With CLICKRANK_COVISIT_CACHE_S set, a predict within the TTL of another reads only the history (the
    user's co-visitation sets come from the cache, same answer); after the TTL a change in Redis shows."""
    settings = app_settings(redis_server.url, model_dir, covisit_weight=3.0, covisit_cache_s=0.5)
    async with running_app(settings) as (c, _):
        last, linked = catalog[600], catalog[601]
        await post_events(c, [event("a", last, NOW - 900), event("a", linked, NOW - 890)])
        await post_events(c, [event("me", last, NOW - 60)])
        body = {"user_id": "me", "candidates": [linked, catalog[602]]}

        async def predict() -> tuple[dict[str, float], float]:
            got = (await c.post("/v1/predict", json=body)).json()["predictions"]
            reads = await scraped_metric(c, "clickrank_redis_seconds_count", op="candidates")
            return {p["item_id"]: p["click_probability"] for p in got}, reads

        first, reads = await predict()
        again, reads_again = await predict()
        assert again == first and reads_again == reads  # no co-visitation read within the TTL
        with redis.Redis.from_url(redis_url) as r:
            r.delete(f"cr:cv:{last}")
        time.sleep(0.6)
        later, reads_later = await predict()
        assert reads_later == reads + 1
        assert later[linked] < first[linked]  # the link is gone: no boost any more


async def test_the_fresh_list_is_reused_for_its_ttl_and_each_user_still_loses_what_they_saw(
    redis_server: Any, model_dir: Path, catalog: list[str]
) -> None:
    """With CLICKRANK_LISTS_CACHE_S set, the fresh list read by one recommend serves the next ones until it
    expires (an item added meanwhile waits for it), while the user's own exclusions apply at once. The
    TTL leaves room for an item's encoding on a busy machine (at 0.5 s a loaded CI run saw it expire)."""
    ttl_s = 2.0
    async with running_app(narrow_settings(redis_server.url, model_dir, lists_cache_s=ttl_s)) as (c, _):
        await history_user(c, "lc", catalog[710:713])
        stamp = time.time_ns()
        first, second = f"lc-first:{stamp}", f"lc-second:{stamp}"

        async def upsert(item_id: str) -> None:
            items = {"items": [{"item_id": item_id, "text": "Another New Film (2026) | Comedy"}]}
            assert (await c.post("/v1/items", json=items)).json() == {"upserted": 1}

        async def fresh_shown() -> tuple[float, set[str]]:
            before = await scraped_metric(c, "clickrank_candidates_sum", source="fresh")
            items = {i["item_id"] for i in (await recommend(c, "lc"))["items"]}
            return await scraped_metric(c, "clickrank_candidates_sum", source="fresh") - before, items

        await upsert(first)
        count, items = await fresh_shown()
        assert count == 1 and first in items  # read now: first; catalog[710:713] are the user's own
        await upsert(second)
        count, items = await fresh_shown()
        assert count == 1 and first in items  # the list read a moment ago (re-read: second and first, 2)
        await post_events(c, [event("lc", first, NOW)])
        count, items = await fresh_shown()
        assert count == 0 and first not in items  # the user saw it: dropped from the cached list too
        time.sleep(ttl_s + 0.1)
        count, items = await fresh_shown()
        assert count == 1 and second in items  # read again: second, first (seen), catalog[712] (seen)


# ------------------------------------------------------------------------------------------- merge logic


def test_merge_normalises_each_source_and_weights_the_latest_most() -> None:
    rows = {"x": 0, "y": 1, "z": 2}
    catalog = SimpleNamespace(index_of=lambda ids: np.array([rows.get(i, -1) for i in ids], dtype=np.int64))
    latest = Followers.of([("x", 3.0), ("gone", 4.0), ("y", 1.0)], catalog)  # x 3/8, y 1/8; gone: no row
    popular = Followers.of([("y", 100.0), ("z", 100.0)], catalog)  # an older item: y 0.5 / 2, z 0.5 / 2
    merged = Covisitation.merge([latest, popular, Followers.of([], catalog)])
    assert merged.rows.tolist() == [0, 1, 2]
    assert merged.scores == pytest.approx([3 / 8, 1 / 8 + 0.25, 0.25])
    assert merged.best(3, np.empty(0, dtype=np.int64)).tolist() == [0, 1, 2]
    assert merged.best(3, np.array([1])).tolist() == [0, 2]  # excluded; ties keep the lower row first
    assert merged.of(np.array([2, -1, 7, 0])) == pytest.approx([0.25, 0.0, 0.0, 3 / 8])
    assert len(Covisitation.merge([Followers.of([("a", 0.0)], catalog)])) == 0


def test_the_follower_cache_reuses_a_set_for_its_ttl_and_stays_bounded() -> None:
    one = Followers(np.array([1]), np.array([1.0]))
    cache = FollowerCache(ttl_s=0.2, max_items=3)
    cache.put({"a": one, "b": one})
    assert cache.split(["a", "c", "b"]) == ({"a": one, "b": one}, ["c"])
    cache.put({"c": one, "d": one})  # over the bound: the cache starts again
    assert cache.split(["a", "c", "d"]) == ({"c": one, "d": one}, ["a"])
    time.sleep(0.25)
    assert cache.split(["c"]) == ({}, ["c"])
    off = FollowerCache(ttl_s=0.0)
    off.put({"a": one})
    assert off.split(["a"]) == ({}, ["a"])


def test_last_distinct_is_latest_first() -> None:
    assert last_distinct(["a", "b", "a", "c", "c"], 3) == ["c", "a", "b"]
    assert last_distinct(["a"], 0) == []


async def test_covisitation_weight_boosts_the_probability_the_same_in_predict_and_recommend(
    redis_server: Any, redis_url: str, model_dir: Path, catalog: list[str]
) -> None:
    """With CLICKRANK_COVISIT_WEIGHT=β the probability is p·e^(β·cv) / (1 + Σ_linked p_j (e^(β·cv_j) − 1)),
    written out here from the ONNX oracle and the co-visitation set in Redis."""
    weight = 3.0
    settings = app_settings(redis_server.url, model_dir, covisit_weight=weight)
    async with running_app(settings) as (c, app):
        last, linked, other = catalog[300], catalog[301], catalog[302]
        # two users went from `last` to `linked`, one of them then to `other`
        await post_events(c, [event("a", last, NOW - 900), event("a", linked, NOW - 890)])
        await post_events(
            c,
            [event("b", last, NOW - 800), event("b", linked, NOW - 790), event("b", other, NOW - 780)],
        )
        mine = [event("me", last, NOW - 60)]  # one source item: its co-visitation set is the whole cv
        await post_events(c, mine)
        with redis.Redis.from_url(redis_url) as r:
            entries = r.zrevrange(f"cr:cv:{last}", 0, -1, withscores=True)
        total = sum(score for _, score in entries)
        cv = {m.decode(): score / total for m, score in entries}
        assert set(cv) == {linked, other} and cv[linked] > cv[other]

        files = ModelFiles(model_dir)
        live = app.state.services.model.catalog
        files.live_catalog = lambda: np.asarray(live.vectors, dtype=np.float64)
        events = [{"item_id": e["item_id"], "type": e["type"], "timestamp": e["timestamp"]} for e in mine]
        candidates = catalog[400:403] + list(cv)
        plain = dict(zip(candidates, files.probabilities(events, candidates), strict=True))
        norm = 1.0 + sum(plain[i] * math.expm1(weight * cv[i]) for i in cv)
        expected = {i: p * math.exp(weight * cv.get(i, 0.0)) / norm for i, p in plain.items()}

        body = (await c.post("/v1/predict", json={"user_id": "me", "candidates": list(plain)})).json()
        got = {p["item_id"]: p["click_probability"] for p in body["predictions"]}
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-9)
        assert got[linked] > plain[linked]  # boosted; an unlinked item only shares the new normaliser

        shown = (await c.post("/v1/recommend", json={"user_id": "me", "top_k": 100})).json()["items"]
        in_both = {i["item_id"]: i["click_probability"] for i in shown if i["item_id"] in got}
        assert linked in in_both
        assert in_both == pytest.approx({i: got[i] for i in in_both}, rel=1e-5)
