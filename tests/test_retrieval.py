"""Retrieval over the catalog, exact and approximate (faiss IVF on augmented vectors): recall of the top
300 against exact search, exclusions, items added or changed after the index was built, the estimated
partition, and the service answering the same through HTTP with the index on as with it off."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import app_settings, metric, running_app

from models.calibration import logsumexp
from models.model_dir import ModelDir
from service.catalog import ItemCatalog
from service.retrieval import Retrieval, contained, top_rows


@pytest.fixture(scope="module")
def real_vectors(model_dir: Path) -> np.ndarray:
    return ModelDir(model_dir).load().items.vectors


@pytest.fixture(scope="module")
def big_catalog(real_vectors: np.ndarray) -> ItemCatalog:
    """30,000 items drawn like the exported model's item vectors (their mean and covariance)."""
    rng = np.random.default_rng(0)
    mean, cov = real_vectors.mean(axis=0), np.cov(real_vectors, rowvar=False)
    vectors = rng.multivariate_normal(mean, cov, size=30_000).astype(np.float32)
    ids = [f"i{k}" for k in range(len(vectors))]
    return ItemCatalog(ids, ids, vectors, np.zeros_like(vectors), "test")


@pytest.fixture(scope="module")
def approximate(big_catalog: ItemCatalog) -> Retrieval:
    retrieval = Retrieval(big_catalog, ann_min_items=10_000)
    assert retrieval.approximate and not Retrieval(big_catalog, ann_min_items=10**9).approximate
    return retrieval


def queries(vectors: np.ndarray, n: int) -> np.ndarray:
    """User-like queries: sums of a few random items' vectors (a user vector lives in the item space)."""
    rng = np.random.default_rng(1)
    return np.stack([vectors[rng.choice(len(vectors), 5)].mean(axis=0) for _ in range(n)]).astype(np.float32)


def test_ann_top_300_recalls_the_exact_one_and_never_returns_an_excluded_row(
    big_catalog: ItemCatalog, approximate: Retrieval
) -> None:
    catalog = big_catalog
    recalls = []
    for q in queries(catalog.vectors, 30):
        excluded = np.sort(np.random.default_rng(2).choice(len(catalog), 50, replace=False))
        exact = top_rows(catalog.vectors @ q, 300, excluded)
        scores = approximate.scores(q)
        found = approximate.top(scores, 300, excluded)
        assert len(found) == 300 and not np.isin(found, excluded).any()
        logits = catalog.vectors[found] @ q
        assert np.all(np.diff(logits) <= 1e-6), "best first, by the current vectors"
        recalls.append(len(set(found.tolist()) & set(exact.tolist())) / 300)
        true_log_z = float(logsumexp(catalog.vectors @ q))
        assert abs(scores.log_partition - true_log_z) < 0.05, "the estimated partition is within 5%"
    assert np.mean(recalls) >= 0.95, np.mean(recalls)


def test_items_added_after_the_index_are_found(big_catalog: ItemCatalog) -> None:
    vectors = big_catalog.vectors
    local = ItemCatalog(big_catalog.item_ids, big_catalog.item_ids, vectors, np.zeros_like(vectors), "t")
    retrieval = Retrieval(local, ann_min_items=10_000)
    q = queries(vectors, 1)[0]
    local.upsert_local([("brand-new", "brand new", (q * 50).astype(np.float32))])
    scores = retrieval.scores(q)
    found = retrieval.top(scores, 10, np.empty(0, dtype=np.int64))
    assert local.item_ids[found[0]] == "brand-new"
    assert scores.size == len(local) and scores.log_partition >= float(scores.logits(found[:1])[0])


def test_with_every_list_scanned_the_partition_is_exact_and_counts_every_row_once(
    big_catalog: ItemCatalog,
) -> None:
    """Every row is counted exactly once: the scanned lists' rows from their distances, the heavy rows
    only outside them, rows added later (indexed, and one longer than M kept out of the index)."""
    vectors = big_catalog.vectors
    local = ItemCatalog(big_catalog.item_ids, big_catalog.item_ids, vectors, np.zeros_like(vectors), "t")
    retrieval = Retrieval(local, ann_min_items=10_000, nprobe=10**6)
    q = queries(vectors, 1)[0]
    local.upsert_local(
        [("later", "later", vectors[5] * 0.9), ("longer", "longer", (vectors[7] * 40).astype(np.float32))]
    )
    for user_vector in (q, -q, q * 3):
        scores = retrieval.scores(user_vector)
        exact = local.vectors @ user_vector
        assert scores.log_partition == pytest.approx(float(logsumexp(exact)), abs=1e-5)
        found = retrieval.top(scores, 300, np.empty(0, dtype=np.int64))
        np.testing.assert_array_equal(found, top_rows(exact, 300, np.empty(0, dtype=np.int64)))


def test_items_whose_vector_changed_are_indexed_again_by_it(big_catalog: ItemCatalog) -> None:
    """An update takes the row out of what counted it (a heavy row, a sampled or other built row, an added
    row, one updated twice, one now longer than M) and indexes it by its new vector: every row is still
    counted once, with every list scanned the partition and the top 300 are exact, and with few lists
    scanned a row moved next to the query is its best row and the partition stays within 5 %."""
    vectors = big_catalog.vectors
    ids = big_catalog.item_ids
    local = ItemCatalog(ids, ids, vectors, np.zeros_like(vectors), "t")
    everything = Retrieval(local, ann_min_items=10_000, nprobe=10**6)
    few = Retrieval(local, ann_min_items=10_000)
    index = few._index
    assert index is not None
    heavy, sampled = int(index.heavy[0]), int(index.sample[0])
    other = int(np.setdiff1d(np.arange(100), np.r_[index.heavy, index.sample])[0])
    local.upsert_local([("added", "added", vectors[3] * 0.5)])
    q = queries(vectors, 1)[0]
    for user_vector in (q, -q):  # both indexes take in the append
        everything.scores(user_vector), few.scores(user_vector)
    rng = np.random.default_rng(4)
    moved = {i: rng.standard_normal(vectors.shape[1]).astype(np.float32) for i in (heavy, sampled, other)}
    local.upsert_local([(ids[i], ids[i], v) for i, v in moved.items()] + [("added", "added", vectors[9])])
    local.upsert_local([(ids[other], ids[other], (q * 50).astype(np.float32))])  # twice, now next to q
    local.upsert_local([(ids[11], ids[11], (q * -60).astype(np.float32))])  # longer than M, away from q

    for retrieval in (everything, few):
        scores = retrieval.scores(q)
        index = retrieval._index
        assert index is not None
        counted = index.others_per_list.sum() + len(index.heavy) + len(index.added) + len(index.oversized)
        assert counted == len(local) and index.index.ntotal + len(index.oversized) == len(local)
        assert heavy not in index.heavy and sampled not in index.sample and 11 in index.oversized
        assert retrieval.top(scores, 10, np.empty(0, dtype=np.int64))[0] == other
    for user_vector in (q, -q, q * 3):
        exact = local.vectors @ user_vector
        scores = everything.scores(user_vector)
        assert scores.log_partition == pytest.approx(float(logsumexp(exact)), abs=1e-5)
        found = everything.top(scores, 300, np.empty(0, dtype=np.int64))
        np.testing.assert_array_equal(found, top_rows(exact, 300, np.empty(0, dtype=np.int64)))
    for user_vector in queries(vectors, 10):
        estimate = few.scores(user_vector).log_partition
        assert abs(estimate - float(logsumexp(local.vectors @ user_vector))) < 0.05


def test_a_heavy_row_counts_and_is_found_though_its_list_is_not_scanned() -> None:
    """The built rows of largest norm are scored on every query: one far longer than the rest is the best
    row for users whose one scanned list is not its own, and their partition holds it."""
    rng = np.random.default_rng(0)
    vectors = (rng.standard_normal((30_000, 32)) * 0.3 + 0.1).astype(np.float32)
    vectors[0] = 0.0
    vectors[0, 0] = 2 * float(np.linalg.norm(vectors, axis=1).max())
    ids = [f"i{k}" for k in range(len(vectors))]
    catalog = ItemCatalog(ids, ids, vectors, np.zeros_like(vectors), "t")
    retrieval = Retrieval(catalog, ann_min_items=1, nprobe=1)
    index = retrieval._index
    assert index is not None and 0 in index.heavy
    own_list = index.heavy_lists[np.searchsorted(index.heavy, 0)]
    checked = 0
    for user_vector in vectors[1:100] + np.eye(32, dtype=np.float32)[0] * 0.5:
        exact = vectors @ user_vector
        query = np.append(user_vector, 0.0).astype(np.float32)[None]
        if np.argmax(exact) != 0 or own_list in index.index.quantizer.search(query, 1)[1]:
            continue
        checked += 1
        scores = retrieval.scores(user_vector)
        assert retrieval.top(scores, 10, np.empty(0, dtype=np.int64))[0] == 0
        assert scores.log_partition >= float(exact[0])
        assert scores.log_partition == pytest.approx(float(logsumexp(exact)), abs=0.05)
    assert checked >= 10


@pytest.mark.anyio
async def test_the_service_answers_the_same_with_the_index_on(
    redis_url: str, model_dir: Path, catalog: list[str]
) -> None:
    """With ``ann_min_items=1`` the tiny catalog is searched through the IVF index, every list probed (so
    the search is exhaustive and the partition's sample covers every row): recommend and predict answer
    as with exact retrieval, through the same plumbing the approximate search uses."""
    events = [
        {"user_id": "r", "item_id": catalog[i], "type": "click", "timestamp": 1.7e9 + i, "event_id": f"r{i}"}
        for i in range(8)
    ]  # posted to both apps: the second time all duplicates, so both rank the same stored state
    answers = []
    for ann_min_items in (10**9, 1):
        settings = app_settings(
            redis_url, model_dir, ann_min_items=ann_min_items, ann_nprobe=10_000, covisit_weight=0.0
        )
        async with running_app(settings) as (client, app):
            assert app.state.services.model.ranker.retrieval.approximate is (ann_min_items == 1)
            await client.post("/v1/events", json={"events": events})
            rec = (await client.post("/v1/recommend", json={"user_id": "r", "top_k": 10})).json()
            pred = await client.post("/v1/predict", json={"user_id": "r", "candidates": catalog[100:120]})
            answers.append((rec["items"], pred.json()["predictions"]))
    (exact_rec, exact_pred), (ann_rec, ann_pred) = answers
    assert [i["item_id"] for i in ann_rec] == [i["item_id"] for i in exact_rec]
    for a, b in zip(ann_pred + ann_rec, exact_pred + exact_rec, strict=True):
        assert a["click_probability"] == pytest.approx(b["click_probability"], rel=1e-4)


@pytest.mark.anyio
async def test_with_a_history_the_candidates_logits_are_dot_products_not_a_ranker_pass(
    redis_url: str, model_dir: Path, catalog: list[str]
) -> None:
    """The exported model has no re-ranker, so with a history a candidate's logit is the dot product of
    the user vector and its item vector: recommend and predict compute the candidates' logits from the one
    ranker request that gives the user vector (an item encoded from its text too), and answer what the
    ranker graph itself gives over them."""
    events = [
        {"user_id": "d", "item_id": catalog[i], "type": "click", "timestamp": 1.7e9 + i, "event_id": f"d{i}"}
        for i in range(0, 40, 5)
    ]
    async with running_app(app_settings(redis_url, model_dir)) as (client, app):
        models = app.state.services.model.ranker.models
        assert models.dot_logits, "the tiny export is trained without the re-ranker"
        await client.post("/v1/events", json={"events": events})
        answers, ranker_requests = [], []
        candidates = [*catalog[200:230], {"item_id": "unseen", "text": "a new documentary about trains"}]
        for dot_logits in (True, False):
            models.dot_logits = dot_logits
            before = metric((await client.get("/metrics")).text, "clickrank_batch_size_sum")
            rec = await client.post("/v1/recommend", json={"user_id": "d", "top_k": 20})
            after = metric((await client.get("/metrics")).text, "clickrank_batch_size_sum")
            pred = await client.post("/v1/predict", json={"user_id": "d", "candidates": candidates})
            answers.append(rec.json()["items"] + pred.json()["predictions"])
            ranker_requests.append(after - before)
    assert ranker_requests == [1, 2], "the user vector's request alone, against a second pass over the window"
    dot, graph = answers
    assert len(dot) == 20 + len(candidates)
    assert [i["item_id"] for i in dot] == [i["item_id"] for i in graph]
    for a, b in zip(dot, graph, strict=True):
        assert a["click_probability"] == pytest.approx(b["click_probability"], rel=1e-4)


def test_containment_by_binary_search_matches_isin() -> None:
    rng = np.random.default_rng(3)
    for _ in range(100):
        sorted_rows = np.sort(rng.choice(5000, 400, replace=False))
        rows = rng.choice(5200, 40)  # some past the last sorted row
        np.testing.assert_array_equal(contained(rows, sorted_rows), np.isin(rows, sorted_rows))
    assert not contained(np.arange(3), np.empty(0, dtype=np.int64)).any()


def test_exact_scores_follow_every_catalog_snapshot() -> None:
    """Exact logits and log-partition equal a float64 reference product; after an upsert changes one
    item's vector and adds another, the next call scores the new snapshot (the transpose it multiplies by
    is made again), and the rows of an earlier answer keep their old values. An upsert that only adds
    items extends that transpose in place, past the columns an earlier answer was scored with."""
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(500, 16)).astype(np.float32)
    ids = [f"i{k}" for k in range(len(vectors))]
    catalog = ItemCatalog(ids, ids, vectors, np.zeros_like(vectors), "test")
    retrieval = Retrieval(catalog, ann_min_items=10**9)
    users = rng.normal(size=(3, 16)).astype(np.float32)

    def reference(catalog_vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits = users.astype(np.float64) @ catalog_vectors.astype(np.float64).T
        return logits, logsumexp(logits, axis=1)

    before = retrieval.exact_scores(users)
    logits, log_z = reference(vectors)
    for scores, row_logits, z in zip(before, logits, log_z, strict=True):
        np.testing.assert_allclose(scores.exact, row_logits, rtol=1e-5, atol=1e-5)
        assert scores.log_partition == pytest.approx(z, rel=1e-6)

    changed, added = rng.normal(size=16).astype(np.float32), rng.normal(size=16).astype(np.float32)
    assert catalog.upsert_local([("i7", "i7", changed), ("new", "new", added)]) == 2
    after = retrieval.exact_scores(users)
    logits, log_z = reference(catalog.vectors)
    assert len(after[0].exact) == 501
    for scores, row_logits, z in zip(after, logits, log_z, strict=True):
        np.testing.assert_allclose(scores.exact, row_logits, rtol=1e-5, atol=1e-5)
        assert scores.log_partition == pytest.approx(z, rel=1e-6)
    np.testing.assert_allclose(before[0].exact[7], users[0] @ vectors[7], rtol=1e-5)

    held = retrieval._columns_of(catalog.vectors)
    held_copy = held.copy()
    appended = rng.normal(size=(3, 16)).astype(np.float32)
    assert catalog.upsert_local([(f"more-{k}", "more", v) for k, v in enumerate(appended)]) == 3
    extended = retrieval.exact_scores(users)
    logits, log_z = reference(catalog.vectors)
    for scores, row_logits, z in zip(extended, logits, log_z, strict=True):
        np.testing.assert_allclose(scores.exact, row_logits, rtol=1e-5, atol=1e-5)
        assert scores.log_partition == pytest.approx(z, rel=1e-6)
    assert np.shares_memory(retrieval._columns_of(catalog.vectors), held)  # extended, not copied
    np.testing.assert_array_equal(held, held_copy)
