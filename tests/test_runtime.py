"""OnnxModels on a real exported model: providers, padding-invariant ranking, text encoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from helpers import local_metric

from models.features import EVENT_TYPES, event_type_id, gap_buckets, value_bucket
from models.model_dir import RANKER, ItemTable, ModelDir, ModelLoadError, ServedModel
from service.runtime import (
    CANDIDATE_BUCKETS,
    RANKER_INPUTS,
    History,
    OnnxModels,
    RankRequest,
    bucket,
    history_buckets,
)


@pytest.fixture(scope="module")
def served(model_dir: Path) -> ServedModel:
    return ModelDir(model_dir).load()


@pytest.fixture(scope="module")
def models(served: ServedModel) -> OnnxModels:
    return OnnxModels(served, device="cpu")


@pytest.fixture(scope="module")
def item_vectors(served: ServedModel) -> np.ndarray:
    return served.items.vectors


def make_request(
    rng: np.random.Generator, item_vectors: np.ndarray, n: int, c: int
) -> tuple[RankRequest, np.ndarray]:
    """A request of n real catalog events (random types, ratings, times) and c catalog candidates."""
    rows = rng.integers(0, len(item_vectors), n)
    types = [EVENT_TYPES[t] for t in rng.integers(0, len(EVENT_TYPES), n)]
    timestamps = np.sort(rng.uniform(8.8e8, 8.9e8, n))
    history = History(
        vectors=item_vectors[rows],
        types=np.array([event_type_id(t) for t in types], dtype=np.int64),
        values=np.array(
            [value_bucket(float(rng.integers(1, 6)) if t == "rate" else None) for t in types], dtype=np.int64
        ),
        gaps=gap_buckets(timestamps),
    )
    request = RankRequest(history, item_vectors[rng.integers(0, len(item_vectors), c)])
    return request, timestamps


def exact_shape_run(model_dir: Path, request: RankRequest) -> list[np.ndarray]:
    """The ranker run directly at the request's own shape [1, n, D] / [1, C, D]: no bucket padding."""
    session = ort.InferenceSession(str(ModelDir(model_dir).file(RANKER)), providers=["CPUExecutionProvider"])
    h = request.history
    feeds = (
        h.vectors,
        h.types,
        h.values,
        h.gaps,
        np.ones(len(h), dtype=np.float32),
        request.candidate_vectors,
    )
    return session.run(None, {k: v[None] for k, v in zip(RANKER_INPUTS, feeds, strict=True)})


def test_manifest_fields_and_providers(models: OnnxModels, served: ServedModel) -> None:
    manifest = served.manifest
    assert models.version == manifest["version"]
    assert models.dim == manifest["config"]["dim"]
    assert models.history_length == manifest["config"]["history_length"]
    assert models.providers == ["CPUExecutionProvider"]


def test_auto_device_uses_cuda_only_when_offered(served: ServedModel) -> None:
    expected = "CUDAExecutionProvider" if "CUDAExecutionProvider" in ort.get_available_providers() else None
    providers = OnnxModels(served, device="auto").providers
    assert providers[0] == (expected or "CPUExecutionProvider")


def test_cuda_runs_in_full_float32(served: ServedModel) -> None:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime offers no CUDA")
    models = OnnxModels(served, device="cuda")
    for session in (models._ranker, models._encoder):
        assert session.get_provider_options()["CUDAExecutionProvider"]["use_tf32"] == "0"


def test_cuda_device_without_cuda_is_a_load_error(served: ServedModel) -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime offers CUDA")
    with pytest.raises(ModelLoadError, match=r"device=cuda"):
        OnnxModels(served, device="cuda")


def test_buckets() -> None:
    assert history_buckets(20) == (8, 16, 20)
    assert history_buckets(50) == (8, 16, 32, 50)
    assert [bucket(s, CANDIDATE_BUCKETS) for s in (1, 2, 16, 17, 100, 300, 1024)] == [
        1,
        16,
        16,
        32,
        112,
        320,
        1024,
    ]
    assert bucket(1025, CANDIDATE_BUCKETS) == 2048


def test_batched_ranking_equals_each_request_alone(models: OnnxModels, item_vectors: np.ndarray) -> None:
    rng = np.random.default_rng(7)
    length = models.history_length
    shapes = [(0, 3), (1, 1), (5, 17), (length, 40), (length - 1, 300), (2, 2)]
    requests = [make_request(rng, item_vectors, n, c)[0] for n, c in shapes]
    batched = models.rank(requests)
    assert len(batched) == len(requests)
    for (n, c), request, got in zip(shapes, requests, batched, strict=True):
        alone = models.rank([request])[0]
        assert all(np.isfinite(a).all() for a in (got.logits, got.attention, got.user_vector)), (n, c)
        assert got.logits.shape == (c,) and got.logits.dtype == np.float32
        assert got.attention.shape == (c, n) and got.user_vector.shape == (models.dim,)
        np.testing.assert_allclose(got.logits, alone.logits, atol=1e-5, rtol=0)
        np.testing.assert_allclose(got.attention, alone.attention, atol=1e-5, rtol=0)
        np.testing.assert_allclose(got.user_vector, alone.user_vector, atol=1e-5, rtol=0)
        if n:
            np.testing.assert_allclose(got.attention.sum(axis=1), 1.0, atol=1e-5)
            assert (got.attention >= 0).all()
        else:
            np.testing.assert_array_equal(got.user_vector, 0.0)


def test_bucket_padding_matches_the_exact_shape(
    models: OnnxModels, item_vectors: np.ndarray, model_dir: Path
) -> None:
    rng = np.random.default_rng(11)
    for n, c in ((3, 5), (models.history_length, 33)):
        request = make_request(rng, item_vectors, n, c)[0]
        logits, attention, users = exact_shape_run(model_dir, request)
        got = models.rank([request])[0]
        np.testing.assert_allclose(got.logits, logits[0], atol=1e-5, rtol=0)
        np.testing.assert_allclose(got.attention, attention[0], atol=1e-5, rtol=0)
        np.testing.assert_allclose(got.user_vector, users[0], atol=1e-5, rtol=0)


def test_history_changes_the_scores(models: OnnxModels, item_vectors: np.ndarray) -> None:
    rng = np.random.default_rng(3)
    request = make_request(rng, item_vectors, 10, 20)[0]
    h = request.history
    cold = RankRequest(
        History(h.vectors[:0], h.types[:0], h.values[:0], h.gaps[:0]), request.candidate_vectors
    )
    with_history, without = models.rank([request, cold])
    assert np.abs(with_history.logits - without.logits).max() > 1e-3


def test_long_history_keeps_the_newest_events(models: OnnxModels, item_vectors: np.ndarray) -> None:
    rng = np.random.default_rng(5)
    length = models.history_length
    request, timestamps = make_request(rng, item_vectors, length + 7, 12)
    h = request.history
    newest = History(
        vectors=h.vectors[-length:],
        types=h.types[-length:],
        values=h.values[-length:],
        gaps=gap_buckets(timestamps[-length:]),  # the window's first gap is 0, as in training
    )
    window = RankRequest(newest, request.candidate_vectors)
    long, cut = models.rank([request, window])
    assert long.attention.shape == (12, length)
    np.testing.assert_allclose(long.logits, cut.logits, atol=1e-5, rtol=0)
    np.testing.assert_allclose(long.attention, cut.attention, atol=1e-5, rtol=0)


def test_malformed_requests_are_refused(models: OnnxModels, item_vectors: np.ndarray) -> None:
    good = make_request(np.random.default_rng(0), item_vectors, 4, 4)[0]
    h = good.history
    wrong_dim = RankRequest(h, np.zeros((4, models.dim + 1), np.float32))
    short_types = RankRequest(History(h.vectors, h.types[:2], h.values, h.gaps), good.candidate_vectors)
    no_candidates = RankRequest(h, np.zeros((0, models.dim), np.float32))
    for bad, field in ((wrong_dim, "candidate_vectors"), (short_types, "history_types"),
                       (no_candidates, "candidate_vectors")):  # fmt: skip
        with pytest.raises(ValueError, match=f"request 1: {field}"):
            models.rank([good, bad])
    assert models.rank([]) == []


def test_encode_texts_reproduces_the_catalog_text_vectors(models: OnnxModels, served: ServedModel) -> None:
    table: ItemTable = served.items
    text_part = table.vectors - table.id_offsets
    rows = [0, 1, 49, 500, len(table.texts) - 1]
    encoded = models.encode_texts([table.texts[k] for k in rows])
    assert encoded.shape == (len(rows), models.dim) and encoded.dtype == np.float32
    np.testing.assert_allclose(encoded, text_part[rows], atol=1e-4, rtol=0)


def test_encode_texts_is_deterministic_and_batch_independent(models: OnnxModels) -> None:
    texts = ["Heat (1995) | Action, Crime, Thriller", "A", "", "word " * 500, "Toy Story (1995) | Animation"]
    first = models.encode_texts(texts)
    np.testing.assert_array_equal(first, models.encode_texts(texts))
    for i, text in enumerate(texts):
        np.testing.assert_allclose(models.encode_texts([text])[0], first[i], atol=1e-5, rtol=0)
    assert not np.allclose(first[0], first[4], atol=1e-3)
    assert models.encode_texts([]).shape == (0, models.dim)


def test_warm_up_runs_every_bucket(models: OnnxModels) -> None:  # and checks outputs are finite
    def runs() -> float:
        return local_metric("clickrank_inference_seconds_count", graph="ranker")

    before = runs()
    models.warm_up()
    assert runs() - before == len(models.history_buckets) * len(CANDIDATE_BUCKETS)
