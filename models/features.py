"""Event features shared by training and serving.

This module is the single definition of how an event becomes the integer features the ranker
reads, so that the offline model and the online service can never disagree. It imports only numpy.

A history is the user's last ``L`` events, oldest first, **left-padded**: the newest event always sits
in the last slot, which is where the ranker reads the user state from.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

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


@lru_cache(maxsize=4096)  # a served window asks for 50 at a time, nearly always the same few values
def value_bucket(value: float | None) -> int:
    """Bucket of an event's optional numeric value (a star rating for ``rate`` events)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return 1
    return 2 + int(min(max(round(value), 1), 5)) - 1


def gap_buckets(timestamps: Sequence[float]) -> np.ndarray:
    """Bucket of the time since the previous event, for each event of a time-ordered window."""
    ts = np.asarray(timestamps, dtype=np.float64)
    out = np.zeros(len(ts), dtype=np.int64)
    if len(ts) > 1:
        minutes = np.maximum(np.diff(ts), 0.0) / 60.0
        out[1:] = np.minimum(1 + np.floor(np.log2(1.0 + minutes)), NUM_GAP_BUCKETS - 1).astype(np.int64)
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
