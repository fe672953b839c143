"""Beyond-accuracy metrics, calibration helpers and the online replay (``clickrank evaluate --replay``)."""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from models.calibration_report import (
    calibration_summary,
    expected_calibration_error,
    plot_reliability,
    reliability_bins,
)
from models.data import Item, Ratings
from models.evaluate import (
    coverage_at_k,
    genre_features,
    intra_list_diversity,
    pairwise_distances,
    top_k_lists,
)
from models.redis_process import RedisProcess, port_open
from models.replay import (
    SEGMENTS,
    ModelRun,
    Stream,
    accuracy,
    new_items_shown,
    shown_calibration,
    time_cut,
    write_grouplens,
)

# ----------------------------------------------------------------------------------- accuracy metrics


def test_accuracy_of_known_ranks() -> None:
    m = accuracy(np.array([1, 3, 0, 11, 10]))
    assert m["events"] == 5
    assert m["HR@10"] == pytest.approx(3 / 5)  # ranks 1, 3, 10; 11 and a miss are not hits
    expected = (1.0 + 1 / math.log2(4) + 1 / math.log2(11)) / 5
    assert m["NDCG@10"] == pytest.approx(expected)


def test_accuracy_of_no_events_is_nan() -> None:
    m = accuracy(np.array([], dtype=np.int64))
    assert m["events"] == 0 and math.isnan(m["NDCG@10"])


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


def test_new_items_shown_counts_distinct_items_and_lists() -> None:
    shown = np.array([[5, 1, -1], [2, 5, 7], [0, 1, 2], [-1, -1, -1]])
    new = new_items_shown(shown, new_rows=np.array([5, 7, 9]))
    assert new == {"distinct": 2, "of": 3, "lists": 0.5}  # 5 and 7; lists 0 and 1 of four
    assert new_items_shown(shown[:0], np.array([5]))["lists"] == 0.0


def test_new_item_events_count_events_and_items() -> None:
    """Items 5 and 7 have no pre-cutoff rating (5 is rated twice in the stream, 7 once); item 1 had one."""
    items = np.array([5, 1, 5, 7, 1])
    stream = Stream(
        users=["a", "b", "c", "d", "e"],
        items=items,
        values=np.ones(5),
        timestamps=np.arange(5),
        returning=np.zeros(5, dtype=bool),
        new_rows=np.array([5, 7, 9]),
        pre={},
    )
    assert stream.new_item_events() == {"events": 3, "items": 2}


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


def test_shown_calibration_pairs() -> None:
    run = ModelRun(
        ranks=np.array([1, 0]),
        shown=np.array([[5, 6, -1], [7, 8, 9]]),
        probs=np.array([[0.5, 0.1, np.nan], [0.2, 0.1, 0.1]]),
    )
    s = shown_calibration(run, np.array([5, 3]))
    assert s["predictions"] == 5
    assert s["observed_rate"] == pytest.approx(1 / 5)
    assert s["mean_probability"] == pytest.approx(1.0 / 5)
    assert s["shown_per_event"] == pytest.approx(2.5)


# ------------------------------------------------------------------------------------ split, redis


def test_time_cut_never_splits_a_timestamp() -> None:
    ts = np.array([1, 2, 3, 3, 3, 4, 5, 6, 7, 8])
    assert time_cut(ts, 0.1) == 9
    assert time_cut(ts, 0.7) == 2  # index 3 has timestamp 3, which starts at index 2
    with pytest.raises(ValueError):
        time_cut(ts, 1.0)


def test_write_grouplens(tmp_path: Path, data_dir: Path) -> None:
    from models.data import load_dataset

    r = Ratings(
        np.array(["1", "2"], dtype=object),
        np.array(["10", "20"], dtype=object),
        np.array([4.0, 3.0], np.float32),
        np.array([100, 200]),
    )
    out = write_grouplens(data_dir, r, tmp_path / "d")
    assert (out / "u.data").read_text() == "1\t10\t4\t100\n2\t20\t3\t200\n"
    assert (out / "u.item").read_bytes() == (data_dir / "u.item").read_bytes()
    assert len(load_dataset(out).ratings) == 2


def test_redis_process_starts_and_stops(tmp_path: Path) -> None:
    server = RedisProcess(tmp_path)
    with server.running():
        assert port_open(server.port)
        pid = server.pid
    assert server.proc is None and not port_open(server.port)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


# ------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_replay_end_to_end(data_dir: Path, tmp_path: Path) -> None:
    """``clickrank evaluate --replay --tiny --replay-limit 200`` in-process: every row, counts that add
    up, coverage in (0, 1], the report files, and the private redis-server gone afterwards."""
    from clickrank.cli import main

    report = tmp_path / "report"
    out = tmp_path / "replay.json"
    args = ["evaluate", "--replay", "--tiny", "--epochs", "1", "--replay-limit", "200"]
    args += ["--data-dir", str(data_dir), "--report-dir", str(report), "--json", str(out)]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert json.loads((report / "replay.json").read_text())["segments"] == result["segments"]
    assert (report / "reliability.png").is_file() and (report / "segments.png").is_file()

    counts = result["segments"]
    assert result["replayed"] == counts["all"] == 200
    assert counts["returning users"] + counts["new users"] == counts["all"]
    assert 0 <= counts["new items"] <= counts["all"]
    new_events = result["new item events"]
    assert new_events["events"] == counts["new items"]
    assert 0 < new_events["items"] <= new_events["events"] or new_events == {"events": 0, "items": 0}
    assert result["train_ratings"] + result["withheld"] == 90_000
    models = result["models"]
    assert set(models) == {
        "popularity (decayed)",
        "co-occurrence + popularity",
        "id-only transformer (SASRec recipe)",
        "clickrank (service)",
    }
    for name, res in models.items():
        assert set(res["segments"]) == set(SEGMENTS), name
        for seg in SEGMENTS:
            m = res["segments"][seg]
            assert m["events"] == counts[seg]
            if m["events"]:
                assert 0.0 <= m["NDCG@10"] <= m["HR@10"] <= 1.0
        assert 0.0 < res["coverage@10"] <= 1.0
        assert 0.0 <= res["ILD@10"] <= 1.0
        new = res["new items shown"]
        assert 0 <= new["distinct"] <= new["of"] and 0.0 <= new["lists"] <= 1.0
        assert (new["distinct"] == 0) == (new["lists"] == 0.0)
    cal = result["calibration"]
    assert cal["predictions"] > 0 and 0.0 < cal["mean_probability"] < 1.0
    assert 0.0 <= cal["ece"] <= 1.0 and sum(b["count"] for b in cal["bins"]) == cal["predictions"]
    assert result["service"]["degraded"] == 0

    port, pid = result["redis"]["port"], result["redis"]["pid"]
    assert not port_open(port)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
