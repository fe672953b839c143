"""Event features shared by training and serving.

This module is the single definition of how an event becomes the integer features the ranker
reads, so that the offline model and the online service can never disagree. It imports only numpy.

A history is the user's last ``L`` events, oldest first, **left-padded**: the newest event always sits
in the last slot, which is where the ranker reads the user state from.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

EVENT_TYPES: tuple[str, ...] = ("view", "click", "add_to_cart", "purchase", "rate")
"""Event types of the API, in the order of their ids (id 0 is padding)."""

EVENT_TYPE_IDS: dict[str, int] = {name: i + 1 for i, name in enumerate(EVENT_TYPES)}
NUM_EVENT_TYPES = len(EVENT_TYPES) + 1

NUM_VALUE_BUCKETS = 7
"""0 = padding, 1 = no value given, 2..6 = value rounded and clipped to 1..5 (star ratings)."""

# The two ONNX graphs' input and output names: the contract between export and serving.
RANKER_INPUTS: tuple[str, ...] = (
    "history_vectors",
    "history_types",
    "history_values",
    "history_gaps",
    "history_mask",
    "candidate_vectors",
)
RANKER_OUTPUTS: tuple[str, ...] = ("logits", "attention", "user_vectors")
ENCODER_INPUTS: tuple[str, ...] = ("input_ids", "attention_mask")
ENCODER_OUTPUTS: tuple[str, ...] = ("item_vectors",)

NUM_GAP_BUCKETS = 20
"""0 = padding or first event of the window; 1.. = log2 of minutes since the previous event."""


def event_type_id(event_type: str) -> int:
    """The feature id of an API event type; raises KeyError for an unknown type."""
    return EVENT_TYPE_IDS[event_type]


def event_type_ids(event_types: Sequence[str]) -> np.ndarray:
    """``event_type_id`` of each type, as int64 (a dict lookup each, no Python call per event)."""
    return np.fromiter(map(EVENT_TYPE_IDS.__getitem__, event_types), dtype=np.int64, count=len(event_types))


def value_buckets(values: Sequence[float | None]) -> np.ndarray:
    """Bucket of each event's optional numeric value (a star rating for ``rate`` events): 1 for none
    (None or NaN), else 1 + the value rounded half to even and clipped to 1..5. int64."""
    v = np.rint(np.array(values, dtype=np.float64))  # None becomes NaN
    buckets = np.minimum(np.maximum(v, 1.0), 5.0)  # NaN stays NaN (np.clip: twice the time on 50 values)
    buckets += 1.0
    buckets[np.isnan(v)] = 1.0
    return buckets.astype(np.int64)


def value_bucket(value: float | None) -> int:
    """``value_buckets`` of one value."""
    return int(value_buckets([value])[0])


_GAP_EDGES_S = 60.0 * (2.0 ** np.arange(1, NUM_GAP_BUCKETS - 1) - 1.0)
"""Where gap buckets 2..19 start, in seconds: bucket 1 + floor(log2(1 + minutes)) reaches k + 1 at
(2^k - 1) minutes."""


def gap_buckets(timestamps: Sequence[float]) -> np.ndarray:
    """Bucket of the time since the previous event, for each event of a time-ordered window: 0 for the
    first, else 1 + floor(log2(1 + minutes)) capped at ``NUM_GAP_BUCKETS - 1`` (a negative gap counts as
    0), found by binary search over the bucket edges."""
    ts = np.asarray(timestamps, dtype=np.float64)
    out = np.zeros(len(ts), dtype=np.int64)
    if len(ts) > 1:
        out[1:] = _GAP_EDGES_S.searchsorted(ts[1:] - ts[:-1], side="right") + 1
    return out


def encode_window(
    types: Sequence[int], values: Sequence[int], timestamps: Sequence[float], length: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Left-pad one user's last ``length`` events into (types, values, gaps, mask) rows.

    ``types`` are event type ids and ``values`` value buckets, both oldest first.
    """
    n = min(len(types), length)
    t = np.zeros(length, dtype=np.int64)
    v = np.zeros(length, dtype=np.int64)
    g = np.zeros(length, dtype=np.int64)
    m = np.zeros(length, dtype=np.float32)
    if n:
        t[length - n :] = np.asarray(types[-n:], dtype=np.int64)
        v[length - n :] = np.asarray(values[-n:], dtype=np.int64)
        g[length - n :] = gap_buckets(timestamps[-n:])
        m[length - n :] = 1.0
    return t, v, g, m
