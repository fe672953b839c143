"""Beyond-accuracy metrics and calibration helpers (the online replay's tests follow with it)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from models.calibration_report import (
    calibration_summary,
    expected_calibration_error,
    plot_reliability,
    reliability_bins,
)
from models.data import Item
from models.evaluate import (
    coverage_at_k,
    genre_features,
    intra_list_diversity,
    pairwise_distances,
    top_k_lists,
)

# ------------------------------------------------------------------------------------ coverage, ILD


def test_top_k_lists_respects_allowed_and_order() -> None:
    scores = np.array([[0.1, 0.9, 0.5, 0.7], [1.0, 1.0, 0.0, 2.0]])
    allowed = np.array([[True, False, True, True], [True, True, False, False]])
    top = top_k_lists(scores, allowed, k=3)
    assert top[0].tolist() == [3, 2, 0]
    assert top[1].tolist() == [0, 1, -1]  # a tie keeps the lower row first; too few allowed → -1


def test_coverage_counts_distinct_items_in_the_first_k() -> None:
    lists = [[0, 1, 2], [1, 2, 3], [4, -1, -1]]
    assert coverage_at_k(lists, catalog_size=10, k=2) == pytest.approx(4 / 10)  # {0, 1, 2, 4}
    assert coverage_at_k(lists, catalog_size=10, k=3) == pytest.approx(5 / 10)
    assert coverage_at_k(np.array(lists), catalog_size=5, k=10) == pytest.approx(1.0)


def test_evaluate_cases_reports_coverage_and_diversity() -> None:
    from models.evaluate import Case, evaluate_cases, format_table
    from models.sequences import UserSequence

    def seq(items: list[int]) -> UserSequence:
        n = len(items)
        return UserSequence("u", np.array(items), np.zeros(n, np.int64), np.arange(n, dtype=np.float64))

    num_items = 30
    cases = [Case(seq([0]), 5), Case(seq([1, 2]), 7)]
    fixed = np.arange(num_items, dtype=np.float64)  # the same order for everyone: items 29, 28, ...
    genres = np.zeros((num_items, 2), dtype=bool)
    genres[::2, 0] = True  # even items genre 0, odd items genre 1
    genres[1::2, 1] = True
    m = evaluate_cases(lambda h: np.tile(fixed, (len(h), 1)), cases, np.arange(num_items), num_items,
                       item_features=genres)  # fmt: skip
    assert m["coverage@10"] == pytest.approx(10 / 30)  # both cases show items 29..20
    # a top 10 alternating genres: 25 of its 45 pairs differ → Jaccard distance 1, the others 0
    assert m["ILD@10"] == pytest.approx(25 / 45)
    rows = {"m": {"warm": m, "cold": m}}
    table = format_table(rows)
    assert "coverage@10 | ILD@10 |" in table.splitlines()[0] and "| 0.3333 | 0.5556 |" in table
    old = {"m": {"warm": {k: 0.5 for k in ("HR@10", "NDCG@10", "MRR", "AUC")}, "cold": m}}
    assert "coverage" not in format_table(old)  # a table saved before these columns existed


def test_cosine_and_jaccard_distances() -> None:
    x = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0.0, 0.0]])
    d = pairwise_distances(x, "cosine")
    assert d[0, 1] == pytest.approx(1.0)  # orthogonal
    assert d[0, 2] == pytest.approx(1 - 1 / math.sqrt(2))
    assert d[0, 0] == 0.0 and d[3, 3] == 0.0 and d[0, 3] == pytest.approx(1.0)
    g = np.array([[1, 1, 0], [0, 1, 1], [1, 1, 0], [0, 0, 0]], dtype=bool)
    j = pairwise_distances(g, "jaccard")
    assert j[0, 1] == pytest.approx(1 - 1 / 3)
    assert j[0, 2] == 0.0 and j[3, 3] == 0.0 and j[0, 3] == 1.0
    with pytest.raises(ValueError):
        pairwise_distances(x, "euclid")


def test_intra_list_diversity_known_answer() -> None:
    g = np.array([[1, 0], [0, 1], [1, 0], [1, 1]], dtype=bool)
    # list A = items 0, 1, 2: distances (0,1)=1, (0,2)=0, (1,2)=1 → 2/3; list B = 0, 3: 1 - 1/2 = 1/2
    lists = [[0, 1, 2], [0, 3, -1], [2, -1, -1]]  # the third has one item: skipped
    assert intra_list_diversity(lists, g, k=10, metric="jaccard") == pytest.approx((2 / 3 + 1 / 2) / 2)
    identical = intra_list_diversity([[0, 2]], np.eye(4), metric="cosine")
    assert identical == pytest.approx(1.0)  # rows 0 and 2 of the identity are orthogonal
    assert math.isnan(intra_list_diversity([[1]], g, metric="jaccard"))


def test_genre_features() -> None:
    items = [Item("1", "A", "", ("Action", "Comedy")), Item("2", "B", "", ("unknown",))]
    f = genre_features(items)
    assert f.shape == (2, 19) and f.dtype == bool
    assert f[0].sum() == 2 and f[1, 0] and f[1].sum() == 1


# --------------------------------------------------------------------------------------- calibration


def test_ece_is_zero_for_a_calibrated_predictor() -> None:
    # four groups of 10 predictions at 0.1, 0.2, 0.5, 0.9 with exactly that fraction of hits
    probs, outcomes = [], []
    for p in (0.1, 0.2, 0.5, 0.9):
        probs += [p] * 10
        outcomes += [1] * round(p * 10) + [0] * (10 - round(p * 10))
    for strategy in ("equal-mass", "equal-width"):
        n_bins = 4 if strategy == "equal-mass" else 15
        bins = reliability_bins(np.array(probs), np.array(outcomes), n_bins=n_bins, strategy=strategy)
        assert expected_calibration_error(bins) == pytest.approx(0.0, abs=1e-12)
        assert sum(b.count for b in bins) == 40


def test_ece_known_answer_and_ratio() -> None:
    # equal-width: bin [0.2, 0.266..) holds 0.25 x 4 with one hit (rate .25); bin [0.8, 0.866..) holds
    # 0.8 x 4 with no hit → ECE = 0.5 * 0 + 0.5 * 0.8 = 0.4
    probs = np.array([0.25] * 4 + [0.8] * 4)
    outcomes = np.array([1, 0, 0, 0] + [0] * 4)
    bins = reliability_bins(probs, outcomes, 15, "equal-width")
    assert [b.count for b in bins] == [4, 4]
    assert expected_calibration_error(bins) == pytest.approx(0.4)
    s = calibration_summary(probs, outcomes, 15, "equal-width")
    assert s["mean_probability"] == pytest.approx(0.525)
    assert s["observed_rate"] == pytest.approx(1 / 8)
    assert s["ratio"] == pytest.approx(0.525 * 8)
    assert s["ece"] == pytest.approx(0.4)


def test_equal_mass_bins_hold_equal_counts() -> None:
    rng = np.random.default_rng(0)
    probs = rng.random(150) ** 4  # crowded near 0, where equal-width bins would lump them together
    bins = reliability_bins(probs, rng.random(150) < probs, 15, "equal-mass")
    assert [b.count for b in bins] == [10] * 15
    assert all(a.upper <= b.lower for a, b in itertools.pairwise(bins))
    width = reliability_bins(probs, rng.random(150) < probs, 15, "equal-width")
    assert width[0].count > 50


def test_ece_of_overconfident_predictor() -> None:
    # always 0.3, never right: one bin, ECE 0.3
    s = calibration_summary(np.full(20, 0.3), np.zeros(20), 15, "equal-mass")
    assert s["ece"] == pytest.approx(0.3) and s["ratio"] == math.inf


def test_reliability_plot_is_written(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    p = rng.random(300) * 0.1
    bins = reliability_bins(p, rng.random(300) < p, 15)
    plot_reliability(bins, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000
