"""Per-user, time-ordered event sequences and the fixed-length windows the model trains on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.data import Dataset
from models.features import encode_window, event_type_id, value_buckets

RATE = event_type_id("rate")


@dataclass(frozen=True)
class UserSequence:
    user_id: str
    items: np.ndarray  # int64 catalog rows, oldest first
    values: np.ndarray  # int64 value buckets
    timestamps: np.ndarray  # float64 seconds
    types: np.ndarray | None = None  # int64 event type ids; None: every event is a rating

    def __len__(self) -> int:
        return len(self.items)

    def event_types(self) -> np.ndarray:
        return np.full(len(self), RATE, dtype=np.int64) if self.types is None else self.types

    def _take(self, index: slice | np.ndarray) -> UserSequence:
        types = None if self.types is None else self.types[index]
        return UserSequence(
            self.user_id, self.items[index], self.values[index], self.timestamps[index], types
        )

    def slice(self, stop: int) -> UserSequence:
        return self._take(slice(None, stop))

    def window(self, start: int, stop: int) -> UserSequence:
        return self._take(slice(start, stop))

    def without(self, excluded: np.ndarray) -> UserSequence:
        return self._take(~np.isin(self.items, excluded))


def user_sequences(data: Dataset) -> list[UserSequence]:
    """Every user's events as a sequence, ordered by time (the events are already time-sorted)."""
    row = {item_id: i for i, item_id in enumerate(data.item_ids)}
    r = data.ratings
    items = np.fromiter((row[i] for i in r.item_ids), dtype=np.int64, count=len(r))
    values = value_buckets(r.ratings)
    types = r.event_types()
    users = r.user_ids
    order = np.argsort(users, kind="stable")  # group by user, keep time order inside
    bounds = np.flatnonzero(users[order][1:] != users[order][:-1]) + 1
    out = []
    for idx in np.split(order, bounds):
        stamps = r.timestamps[idx].astype(np.float64)
        out.append(UserSequence(str(users[idx[0]]), items[idx], values[idx], stamps, types[idx]))
    return out


@dataclass(frozen=True)
class Windows:
    """Training windows: inputs (left-padded to L) and the next item at every position."""

    items: np.ndarray  # [W, L] int64 (0 on padding; check mask)
    types: np.ndarray  # [W, L]
    values: np.ndarray  # [W, L]
    gaps: np.ndarray  # [W, L]
    mask: np.ndarray  # [W, L] float32
    targets: np.ndarray  # [W, L] int64, -1 where there is no next item
    earlier: np.ndarray  # [W, 2] int64: the span of ``user_items`` holding the user's items before the window
    user_items: np.ndarray  # the windowed users' item sequences, concatenated

    def __len__(self) -> int:
        return len(self.items)

    def earlier_items(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(k, item) pairs: the items the user of window ``rows[k]`` had before that window."""
        spans = self.earlier[rows]
        lengths = spans[:, 1] - spans[:, 0]
        return np.repeat(np.arange(len(rows)), lengths), self.user_items[span_indices(spans[:, 0], lengths)]


def span_indices(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The indices ``starts[k] .. starts[k] + lengths[k] - 1`` of every span k, concatenated."""
    return np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())


def history_arrays(seq: UserSequence, length: int) -> tuple[np.ndarray, ...]:
    """The last ``length`` events of a sequence as left-padded (items, types, values, gaps, mask)."""
    types, values, gaps, mask = encode_window(seq.event_types(), seq.values, seq.timestamps, length)
    items = np.zeros(length, dtype=np.int64)
    n = min(len(seq), length)
    if n:
        items[length - n :] = seq.items[-n:]
    return items, types, values, gaps, mask


def make_windows(sequences: list[UserSequence], length: int, stride: int, min_context: int = 0) -> Windows:
    """Windows of ``length + 1`` events ending every ``stride`` events from each sequence's end.

    A target whose context inside its window is shorter than ``min_context`` events is not trained on
    (target -1), unless the window starts the sequence (its context is then the user's whole past):
    with ``min_context = length + 1 - stride`` every event is a target exactly once, read with at least
    that many events before it, as the served user state reads the last ``length``."""
    rows: list[tuple[np.ndarray, ...]] = []
    earlier: list[tuple[int, int]] = []
    offset = 0
    for seq in sequences:
        n = len(seq)
        if n < 2:
            continue
        for end in range(n, 1, -stride):
            start = max(0, end - length - 1)
            inputs = seq.window(start, end - 1)
            items, types, values, gaps, mask = history_arrays(inputs, length)
            targets = np.full(length, -1, dtype=np.int64)
            k = end - 1 - start
            targets[length - k :] = seq.items[start + 1 : end]
            if start > 0 and min_context > 1:
                targets[: length - k + min_context - 1] = -1
            rows.append((items, types, values, gaps, mask, targets))
            earlier.append((offset, offset + start))
            if start == 0:
                break
        offset += n
    stacked = [np.stack(col) for col in zip(*rows, strict=True)]
    user_items = np.concatenate([s.items for s in sequences if len(s) >= 2])
    return Windows(*stacked, np.asarray(earlier, dtype=np.int64).reshape(-1, 2), user_items)
