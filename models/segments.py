"""User segments found at training time, shipped in the model directory (``segments.json``).

Every training user's vector is computed by the exported ``ranker.onnx`` from their last events, exactly
as the service computes it, so a served user falls in the same space; the unit-normalised vectors are
clustered by k-means (k-means++ start, seeded) and each cluster is described by the item attributes its
members' histories over-represent. Item attributes are the comma-separated list after the last `` | `` of
an item's text ("Toy Story (1995) | Animation, Children's, Comedy": its genres), for the catalog's items as
for items added online. Numpy and onnxruntime only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from models.features import RANKER_INPUTS, RANKER_OUTPUTS, encode_window

SEGMENTS_K = 8
TOP_ATTRIBUTES = 5
MIN_SHARE = 0.03
"""An attribute describes a segment only if at least this share of its members' attributes are it."""
_BATCH = 256


def item_attributes(text: str) -> list[str]:
    """The attributes an item's text lists after its last `` | `` (none when there is no such part)."""
    _, sep, tail = text.rpartition(" | ")
    if not sep:
        return []
    return [a.strip() for a in tail.split(",") if a.strip() and a.strip() != "unknown genre"]


@dataclass(frozen=True)
class Segments:
    """The clusters: unit centroids [k, D] and each one's size and description."""

    centroids: np.ndarray
    sizes: list[int]
    top_attributes: list[list[dict[str, float | str]]]  # per segment: {"attribute", "share", "lift"}

    def assign(self, user_vector: np.ndarray) -> int:
        """The segment whose centroid is closest (cosine) to ``user_vector``."""
        return int(np.argmax(self.centroids @ (user_vector / max(float(np.linalg.norm(user_vector)), 1e-12))))

    def to_json(self) -> dict:
        return {
            "method": "k-means on unit user vectors of ranker.onnx (training users' last events)",
            "centroids": self.centroids.round(6).tolist(),
            "segments": [
                {"id": i, "size": n, "top_attributes": top}
                for i, (n, top) in enumerate(zip(self.sizes, self.top_attributes, strict=True))
            ],
        }

    @classmethod
    def from_json(cls, data: dict) -> Segments:
        segments = data["segments"]
        return cls(
            centroids=np.asarray(data["centroids"], dtype=np.float32),
            sizes=[int(s["size"]) for s in segments],
            top_attributes=[list(s["top_attributes"]) for s in segments],
        )


def user_vectors(
    session: object, histories: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    item_vectors: np.ndarray, length: int,
) -> np.ndarray:  # fmt: skip
    """[U, D] user vectors from an onnxruntime session of ``ranker.onnx``; each history is (item rows,
    type ids, value buckets, timestamps), oldest first."""
    dim = item_vectors.shape[1]
    out = []
    for start in range(0, len(histories), _BATCH):
        chunk = histories[start : start + _BATCH]
        vectors = np.zeros((len(chunk), length, dim), dtype=np.float32)
        features = []
        for u, (rows, types, values, stamps) in enumerate(chunk):
            features.append(encode_window(types, values, stamps, length))
            n = min(len(rows), length)
            vectors[u, length - n :] = item_vectors[rows[-n:]]
        types_, values_, gaps_, mask_ = (np.stack(col) for col in zip(*features, strict=True))
        candidates = np.zeros((len(chunk), 1, dim), dtype=np.float32)
        feeds = dict(zip(RANKER_INPUTS, (vectors, types_, values_, gaps_, mask_, candidates), strict=True))
        users = session.run([RANKER_OUTPUTS[2]], feeds)[0]  # type: ignore[attr-defined]
        out.append(users)
    return np.concatenate(out)


def kmeans(points: np.ndarray, k: int, seed: int, iterations: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """(centroids [k, D], labels [N]) of spherical k-means (cosine) with a k-means++ start."""
    rng = np.random.default_rng(seed)
    x = points / np.maximum(np.linalg.norm(points, axis=1, keepdims=True), 1e-12)
    centroids = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        distance = 1.0 - np.max(x @ np.stack(centroids).T, axis=1)
        p = np.maximum(distance, 0.0)
        centroids.append(x[rng.choice(len(x), p=p / p.sum())] if p.sum() > 0 else x[rng.integers(len(x))])
    c = np.stack(centroids)
    labels = np.zeros(len(x), dtype=np.int64)
    for _ in range(iterations):
        new_labels = np.argmax(x @ c.T, axis=1)
        if np.array_equal(new_labels, labels) and _ > 0:
            break
        labels = new_labels
        for j in range(k):
            members = x[labels == j]
            if len(members):
                mean = members.sum(axis=0)
                c[j] = mean / max(float(np.linalg.norm(mean)), 1e-12)
    return c.astype(np.float32), labels


def describe(
    labels: np.ndarray, histories: Sequence[np.ndarray], texts: Sequence[str], k: int
) -> list[list[dict[str, float | str]]]:
    """Per segment, its most over-represented attributes: those with at least ``MIN_SHARE`` of its
    members' item attributes and a lift (share in the segment / share over all users) of at least 1,
    highest lift first."""
    attributes = [item_attributes(t) for t in texts]

    def shares(rows: np.ndarray) -> Counter[str]:
        counts: Counter[str] = Counter(a for r in rows.tolist() for a in attributes[r])
        total = sum(counts.values()) or 1
        return Counter({a: n / total for a, n in counts.items()})

    overall = shares(np.concatenate(list(histories)))
    out = []
    for j in range(k):
        members = [h for h, label in zip(histories, labels.tolist(), strict=True) if label == j]
        here = shares(np.concatenate(members)) if members else Counter()
        eligible = [a for a in here if here[a] >= MIN_SHARE and here[a] >= overall[a]]
        ranked = sorted(eligible, key=lambda a: (here[a] / overall[a], a), reverse=True)
        out.append(
            [
                {"attribute": a, "share": round(here[a], 4), "lift": round(here[a] / overall[a], 3)}
                for a in ranked[:TOP_ATTRIBUTES]
            ]
        )
    return out


def find_segments(
    ranker_onnx: bytes,
    histories: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    item_vectors: np.ndarray,
    texts: Sequence[str],
    length: int,
    seed: int,
    k: int = SEGMENTS_K,
) -> Segments:
    """The segments of these users (see the module docstring)."""
    import onnxruntime as ort

    session = ort.InferenceSession(ranker_onnx, providers=["CPUExecutionProvider"])
    users = user_vectors(session, histories, item_vectors, length)
    k = min(k, len(users))
    centroids, labels = kmeans(users, k, seed)
    sizes = np.bincount(labels, minlength=k).tolist()
    return Segments(centroids, sizes, describe(labels, [h[0][-length:] for h in histories], texts, k))
