"""The trained + exported model: ONNX ↔ PyTorch parity, manifest, metrics harness."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from models.evaluate import rank_metrics
from models.export import RANKER_INPUTS, random_ranker_inputs
from models.ranker import load_ranker

SHAPES = [(1, 1, 1), (1, 50, 100), (3, 7, 5), (8, 20, 64), (32, 13, 300), (64, 50, 100)]


@pytest.fixture(scope="module")
def ranker_pair(model_dir: Path):
    session = ort.InferenceSession(str(model_dir / "ranker.onnx"), providers=["CPUExecutionProvider"])
    return load_ranker(model_dir / "ranker.pt"), session


@pytest.mark.parametrize(("batch", "length", "candidates"), SHAPES)
def test_onnx_matches_pytorch(ranker_pair, batch: int, length: int, candidates: int) -> None:
    ranker, session = ranker_pair
    gen = torch.Generator().manual_seed(1000 + batch * length + candidates)
    args = random_ranker_inputs(batch, length, candidates, ranker.dim, gen, empty_rows=min(1, batch - 1))
    with torch.no_grad():
        logits, attention, user = (t.numpy() for t in ranker(*args))
    got = session.run(None, {name: a.numpy() for name, a in zip(RANKER_INPUTS, args, strict=True)})
    assert all(np.isfinite(g).all() for g in got)
    prob = 1.0 / (1.0 + np.exp(-logits))
    assert np.abs(1.0 / (1.0 + np.exp(-got[0])) - prob).max() <= 1e-4
    assert np.abs(got[1] - attention).max() <= 1e-4
    assert np.abs(got[2] - user).max() <= 1e-4
    mask = args[4].numpy()
    sums = got[1].sum(-1)
    assert np.allclose(sums[mask.sum(1) > 0], 1.0, atol=1e-4), "attention is a distribution over real events"
    assert np.allclose(got[1] * (1 - mask[:, None, :]), 0.0), "no attention on padding"


def test_history_changes_the_prediction(ranker_pair) -> None:
    ranker, _ = ranker_pair
    gen = torch.Generator().manual_seed(7)
    a = random_ranker_inputs(2, 10, 6, ranker.dim, gen)
    b = (a[0].flip(0), *a[1:5], a[5])  # same candidates, swapped histories
    with torch.no_grad():
        assert not torch.allclose(ranker(*a)[0], ranker(*b)[0], atol=1e-4)


def test_manifest_describes_the_export(model_dir: Path) -> None:
    manifest = json.loads((model_dir / "manifest.json").read_text())
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((model_dir / name).read_bytes()).hexdigest() == digest, name
    assert set(manifest["graphs"]["ranker.onnx"]["inputs"]) == set(RANKER_INPUTS)
    assert manifest["parity"]["ranker_max_abs_prob_diff"] <= 1e-4
    table = manifest["metrics"]["table"]
    assert set(table) == {
        "popularity",
        "id-only transformer",
        "clickrank (BERT + transformer)",
        "clickrank, retrieval only",
    }
    vectors = np.load(model_dir / "item_vectors.npy")
    assert vectors.shape == (manifest["num_items"], manifest["config"]["dim"])
    assert (model_dir / "training_curve.png").stat().st_size > 10_000


def test_cold_items_rank_from_text_only(model_dir: Path) -> None:
    """Even the tiny config ranks withheld items above chance from text; ID-only cannot."""
    table = json.loads((model_dir / "metrics.json").read_text())["table"]
    assert table["clickrank (BERT + transformer)"]["cold"]["AUC"] > 0.6
    assert abs(table["id-only transformer"]["cold"]["AUC"] - 0.5) < 0.15
    assert table["popularity"]["cold"]["AUC"] == pytest.approx(0.5)


def test_rank_metrics_on_known_rankings() -> None:
    scores = np.array([[0.9, 0.5, 0.1, 0.0], [0.1, 0.2, 0.3, 0.4], [1.0, 1.0, 1.0, 1.0]])
    allowed = np.ones_like(scores, dtype=bool)
    allowed[1, 3] = False  # item 3 excluded for case 1 (e.g. already seen)
    m = rank_metrics(scores, np.array([0, 0, 2]), allowed)
    # ranks: 1, 3 (item 3 excluded), 2.5 (all tied among 4)
    assert m["HR@10"] == 1.0
    assert m["MRR"] == pytest.approx((1 + 1 / 3 + 1 / 2.5) / 3)
    assert m["AUC"] == pytest.approx((1.0 + 0.0 + 0.5) / 3)
    assert m["NDCG@10"] == pytest.approx((1 + 1 / np.log2(4) + 1 / np.log2(3.5)) / 3)
