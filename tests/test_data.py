"""The MovieLens loader, item text, event features and training windows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.data import DataFormatError, load_dataset
from models.features import (
    EVENT_TYPES,
    NUM_GAP_BUCKETS,
    encode_window,
    event_type_id,
    event_type_ids,
    gap_buckets,
    value_bucket,
    value_buckets,
)
from models.sequences import make_windows, user_sequences


def write_dataset(root: Path, data_lines: list[str], item_lines: list[str] | None = None) -> Path:
    flags = "|".join(["0"] * 18)
    items = item_lines or [
        f"1|Toy Story (1995)|01-Jan-1995||http://x|0|{'|'.join(['0'] * 2)}|1|1|1|{'|'.join(['0'] * 13)}",
        f"2|GoldenEye (1995)|01-Jan-1995||http://x|1|{flags}",
        f"3|Heat (1995)|01-Jan-1995||http://x|0|1|{'|'.join(['0'] * 17)}",
    ]
    (root / "u.item").write_text("\n".join(items) + "\n", encoding="latin-1")
    (root / "u.data").write_text("\n".join(data_lines) + "\n")
    return root


def test_loads_the_shared_partial_dataset(data_dir: Path) -> None:
    data = load_dataset(data_dir)
    assert len(data.items) == 1682
    assert len(data.ratings) == 90_000
    assert np.all(np.diff(data.ratings.timestamps) >= 0), "ratings are time-ordered"
    assert data.items[0].text == "Toy Story (1995) | Animation, Children's, Comedy"
    assert len(data.data_hash) == 64


def test_accepts_any_subset_and_sorts_by_time(tmp_path: Path) -> None:
    write_dataset(tmp_path, ["7\t2\t4\t200", "7\t1\t5\t100", "8\t3\t3\t150"])
    data = load_dataset(tmp_path)
    assert list(data.ratings.item_ids) == ["1", "3", "2"]
    assert list(data.ratings.user_ids) == ["7", "8", "7"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("1\t2\t3", "u.data:2: expected 4 tab-separated fields, got 3"),
        ("1\t2\tx\t5", "u.data:2: could not convert"),
        ("1\t2\t9\t5", "u.data:2: rating 9.0 outside 1..5"),
        ("1\t99\t3\t5", "u.data:2: item 99 is not in u.item"),
    ],
)
def test_malformed_ratings_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    write_dataset(tmp_path, ["1\t1\t4\t100", line])
    with pytest.raises(DataFormatError, match=message):
        load_dataset(tmp_path)


def test_malformed_item_and_missing_files(tmp_path: Path) -> None:
    write_dataset(tmp_path, ["1\t1\t4\t100"], ["1|Toy Story|01-Jan-1995|"])
    with pytest.raises(DataFormatError, match=r"u.item:1: expected 24 '\|'-separated fields, got 4"):
        load_dataset(tmp_path)
    (tmp_path / "u.item").unlink()
    with pytest.raises(DataFormatError, match=r"u.item: file not found"):
        load_dataset(tmp_path)
    with pytest.raises(DataFormatError, match="data directory not found"):
        load_dataset(tmp_path / "nope")


def test_event_features() -> None:
    assert [event_type_id(t) for t in EVENT_TYPES] == [1, 2, 3, 4, 5]
    assert [value_bucket(v) for v in (None, 0.2, 1, 3.4, 5, 11)] == [1, 2, 2, 4, 6, 6]
    gaps = gap_buckets([0, 30, 30 + 60 * 1023, 10**12])
    assert gaps[0] == 0 and gaps[1] == 1 and gaps[2] == 11 and gaps[3] == 19
    assert event_type_ids([*EVENT_TYPES, "rate"]).tolist() == [1, 2, 3, 4, 5, 5]
    with pytest.raises(KeyError):
        event_type_ids(["view", "teleport"])
    types, values, gaps, mask = encode_window([5, 2], [3, 1], [10.0, 20.0], 4)
    assert types.tolist() == [0, 0, 5, 2] and values.tolist() == [0, 0, 3, 1]
    assert mask.tolist() == [0, 0, 1, 1] and gaps.tolist() == [0, 0, 0, 1]
    types, _, _, mask = encode_window([1, 2, 3, 4, 5], [1] * 5, range(5), 3)
    assert types.tolist() == [3, 4, 5] and mask.tolist() == [1, 1, 1], "keeps the newest events"


def test_vectorised_features_match_their_definition() -> None:
    """``value_buckets`` and ``gap_buckets`` compute the documented formulas without a Python call per event:
    1 + (value rounded half to even, clipped to 1..5), 1 for none; 1 + floor(log2(1 + minutes)), capped,
    for each gap (a negative gap counts as 0), here at every bucket edge, a second either side, and at
    random gaps."""
    values = [None, float("nan"), -3.0, 0.2, 0.5, 1, 1.5, 2.5, 3.4, 3.5, 4.5, 4.51, 5, 5.5, 11, float("inf")]
    expected = [1, 1, 2, 2, 2, 2, 3, 3, 4, 5, 5, 6, 6, 6, 6, 6]
    assert value_buckets(values).tolist() == expected and value_buckets(values).dtype == np.int64
    assert [value_bucket(v) for v in values] == expected
    assert value_buckets([]).tolist() == []

    rng = np.random.default_rng(0)
    edges = 60.0 * (2.0 ** np.arange(0, NUM_GAP_BUCKETS + 2) - 1.0)
    gaps = np.concatenate(
        [edges, edges - 1, edges + 1, -rng.integers(1, 100, 20), rng.integers(0, 10**8, 5000)]
    )
    timestamps = np.concatenate([[0.0], np.cumsum(gaps)])  # whole seconds: every sum exact
    minutes = np.maximum(gaps, 0.0) / 60.0
    formula = np.minimum(1 + np.floor(np.log2(1.0 + minutes)), NUM_GAP_BUCKETS - 1)
    assert gap_buckets(timestamps).tolist() == [0, *formula.astype(int).tolist()]
    assert gap_buckets([]).tolist() == [] and gap_buckets([7.0]).tolist() == [0]


def test_windows_predict_the_next_event(data_dir: Path) -> None:
    sequences = user_sequences(load_dataset(data_dir))
    assert sum(len(s) for s in sequences) == 90_000
    seq = max(sequences, key=len)
    windows = make_windows([seq], length=20, stride=10)
    newest = windows.items[0]
    assert newest.tolist() == seq.items[-21:-1].tolist()
    assert windows.targets[0].tolist() == seq.items[-20:].tolist()
    short = make_windows([seq.slice(5)], length=20, stride=10)
    assert len(short) == 1
    assert short.mask[0].sum() == 4 and (short.targets[0] >= 0).sum() == 4


def test_min_context_trains_every_event_once_with_a_long_context(data_dir: Path) -> None:
    """``min_context = length + 1 - stride``: every event but the first is a target exactly once, and
    outside the user's first window only with at least ``min_context`` events before it in its window."""
    seq = max(user_sequences(load_dataset(data_dir)), key=len)
    length, stride = 20, 5
    windows = make_windows([seq], length=length, stride=stride, min_context=length + 1 - stride)
    trained = windows.targets[windows.targets >= 0]
    assert sorted(trained.tolist()) == sorted(seq.items[1:].tolist())
    for row in range(len(windows) - 1):  # the last window starts the sequence
        slots = np.flatnonzero(windows.targets[row] >= 0)
        assert slots.min() == length - stride  # slot s is read with s + 1 events before it
    everything = make_windows([seq], length=length, stride=stride)
    assert (everything.targets >= 0).sum() > len(trained), "without it every slot of every window trains"


def test_each_window_knows_the_items_its_user_had_before_it(data_dir: Path) -> None:
    """``earlier_items``: for every window, exactly the user's items before its first input (what the
    training softmax masks beside the window's own inputs)."""
    sequences = sorted(user_sequences(load_dataset(data_dir)), key=len)[-3:]
    windows = make_windows(sequences, length=20, stride=10, min_context=11)
    starts = []  # (user, first input) of each window, in make_windows' order
    for seq in sequences:
        for end in range(len(seq), 1, -10):
            starts.append((seq, max(0, end - 21)))
            if end <= 21:
                break
    assert len(starts) == len(windows)
    rows = np.array([0, len(windows) - 1, 7, 3, 30])
    pair_rows, items = windows.earlier_items(rows)
    for k, row in enumerate(rows):
        seq, first = starts[row]
        assert sorted(items[pair_rows == k].tolist()) == sorted(seq.items[:first].tolist())
        assert windows.items[row][windows.mask[row] > 0][0] == seq.items[first]
