"""The inference thread's batch (``service.inference.BatchInference``) on a real export: the graph's results,
and each user's exact catalog scores computed with them; and the service using those scores, never
scoring the catalog per request on the event loop while retrieval is exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import app_settings, running_app

from models.calibration import logsumexp
from models.model_dir import ModelDir
from service.catalog import ItemCatalog
from service.inference import BatchInference
from service.retrieval import Retrieval
from service.runtime import History, OnnxModels, RankRequest


def request(vectors: np.ndarray, rows: list[int], candidates: int = 3) -> RankRequest:
    n = len(rows)
    events = np.ones(n, dtype=np.int64)
    return RankRequest(History(vectors[rows], events, events, events), vectors[:candidates])


def test_each_history_gets_its_exact_scores_with_its_graph_result(model_dir: Path) -> None:
    served = ModelDir(model_dir).load()
    models = OnnxModels(served, device="cpu")
    catalog = ItemCatalog.from_table(served.items, models.version)
    vectors = catalog.vectors
    requests = [request(vectors, [1, 5, 9]), request(vectors, []), request(vectors, list(range(10, 30)))]

    ranked = BatchInference(models, Retrieval(catalog, ann_min_items=10**9))(requests)

    alone = models.rank(requests)
    assert ranked[1].scores is None, "an empty history is normalised over the prior, not the catalog"
    for got, expected in zip(ranked, alone, strict=True):
        np.testing.assert_array_equal(got.result.logits, expected.logits)
    for k in (0, 2):
        scores, user_vector = ranked[k].scores, ranked[k].result.user_vector
        assert scores is not None and scores.size == len(catalog)
        np.testing.assert_allclose(
            scores.logits(np.arange(len(catalog))), vectors @ user_vector, rtol=1e-5, atol=1e-6
        )
        assert scores.log_partition == pytest.approx(float(logsumexp(vectors @ user_vector)), rel=1e-6)

    with_index = BatchInference(models, Retrieval(catalog, ann_min_items=1))(requests)
    assert all(r.scores is None for r in with_index), "an index is probed per request, on the event loop"


def test_a_large_catalog_is_scored_a_few_users_at_a_time_with_the_same_result(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    served = ModelDir(model_dir).load()
    catalog = ItemCatalog.from_table(served.items, "t")
    retrieval = Retrieval(catalog, ann_min_items=10**9)
    users = np.random.default_rng(3).standard_normal((5, catalog.dim)).astype(np.float32)
    whole = retrieval.exact_scores(users)
    monkeypatch.setattr("service.retrieval.EXACT_CHUNK_LOGITS", 2 * len(catalog))  # two users a product
    chunked = retrieval.exact_scores(users)
    assert len(chunked) == len(whole) == 5
    bases = [s.exact.base for s in chunked]  # each user's logits are a row of its product's result
    assert bases[0] is bases[1] and bases[1] is not bases[2] and bases[3] is not bases[4]
    for a, b in zip(chunked, whole, strict=True):
        np.testing.assert_array_equal(a.user_vector, b.user_vector)
        np.testing.assert_allclose(a.exact, b.exact, rtol=1e-6, atol=1e-6)
        assert a.log_partition == pytest.approx(b.log_partition, rel=1e-6)


@pytest.mark.anyio
async def test_predict_and_recommend_take_the_catalog_scores_from_the_batch(
    redis_url: str, model_dir: Path, catalog: list[str]
) -> None:
    """With exact retrieval, the per-request scoring of the catalog is never called: the answers, the
    same as before it was switched off, come from the scores computed in the inference thread."""
    events = [
        {"user_id": "b", "item_id": catalog[i], "type": "click", "timestamp": 1.7e9 + i, "event_id": f"b{i}"}
        for i in range(0, 30, 3)
    ]
    async with running_app(app_settings(redis_url, model_dir)) as (client, app):
        retrieval = app.state.services.model.ranker.retrieval
        assert not retrieval.approximate
        await client.post("/v1/events", json={"events": events})
        answers = []
        for per_request in (True, False):
            if not per_request:

                def not_on_the_loop(*args: object, **kwargs: object) -> None:
                    raise AssertionError("Retrieval.scores called per request with exact retrieval")

                retrieval.scores = not_on_the_loop  # type: ignore[method-assign]
            rec = await client.post("/v1/recommend", json={"user_id": "b", "top_k": 10})
            pred = await client.post("/v1/predict", json={"user_id": "b", "candidates": catalog[50:70]})
            assert rec.status_code == pred.status_code == 200
            answers.append(rec.json()["items"] + pred.json()["predictions"])
    assert answers[0] == answers[1]
