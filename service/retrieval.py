"""Retrieval over the catalog: the rows with the largest inner product with a user vector, and the log
of the softmax partition over the whole catalog (the normaliser of ``click_probability``).

Below ``ann_min_items`` rows both are exact numpy (one matrix-vector product). From there on an
approximate index answers: faiss IVF-Flat (4·√N lists, k-means trained on a sample, ``ann_nprobe`` lists
scanned per query) over vectors augmented so that the nearest in Euclidean distance is the largest inner
product (each item gains a coordinate sqrt(M² − |x|²), M 1.1 × the largest norm at build time, a query
a 0). Indexes on the inner product itself, IVF and the graph indexes (HNSW in faiss, hnswlib, usearch),
recalled far less of the top 300 (``loadtests/ann_choice.py``, ``docs/benchmarks.md``). The partition is
estimated: the exact sum over the index's top
``PARTITION_TOP`` and every row added since the build, plus the mean over a fixed uniform sample of
``PARTITION_SAMPLE`` other rows times their number.

The index is built with the model (at load); rows the catalog gains later (``POST /v1/items``, the
catalog sync) are added to it at the next query. Every row the index proposes is re-scored with the
catalog's current vector, so results are ordered by current vectors; an item whose vector changed is
found by its old one until the next model load rebuilds the index.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from models.calibration import logsumexp
from service.catalog import ItemCatalog

log = logging.getLogger(__name__)

PARTITION_TOP = 300
SEARCH_SIZE = 600
"""Rows one index search returns: the partition's top and, with room for a user's seen items, retrieval's."""
PARTITION_SAMPLE = 20_000
TRAIN_PER_LIST = 64
"""k-means training points per inverted list (a sample of the catalog)."""


@dataclass(frozen=True, slots=True)
class UserScores:
    """One user vector against one catalog snapshot: logits of any rows, and the log-partition."""

    user_vector: np.ndarray
    vectors: np.ndarray  # the snapshot's [N, D]
    log_partition: float
    exact: np.ndarray | None  # every row's logit, when they were computed (exact retrieval)
    nearest: np.ndarray | None = None  # the index's best rows, best first (approximate retrieval)

    @property
    def size(self) -> int:
        """Rows covered (an item added later is not)."""
        return len(self.exact) if self.exact is not None else len(self.vectors)

    def logits(self, rows: np.ndarray) -> np.ndarray:
        if self.exact is not None:
            return self.exact[rows]
        return self.vectors[rows] @ self.user_vector


class _Index:
    """A faiss IVF-Flat index over a snapshot's augmented rows (row number = faiss id)."""

    def __init__(self, vectors: np.ndarray, nprobe: int) -> None:
        import faiss

        # One thread: a request's search is small, and idle OpenMP workers spin on the cores the ranker
        # and the event loop need (measured: 138% CPU at 50 requests/s with the default threads).
        faiss.omp_set_num_threads(1)
        started = time.perf_counter()
        n, dim = vectors.shape
        nlist = max(1, int(4 * np.sqrt(n)))
        self.max_norm = 1.1 * float(np.linalg.norm(vectors, axis=1).max())
        augmented = self._augmented(vectors)
        rng = np.random.default_rng(0)
        train = augmented[rng.choice(n, size=min(n, TRAIN_PER_LIST * nlist), replace=False)]
        self.index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim + 1), dim + 1, nlist)
        self.index.train(train)
        self.index.add(augmented)
        self.index.nprobe = min(nprobe, nlist)
        self.built = n  # rows covered at build; rows added later go in too, but are never sampled
        self.indexed = n
        self.oversized = np.empty(0, dtype=np.int64)  # later rows longer than M: always scored exactly
        self.sample = np.sort(rng.choice(n, size=min(PARTITION_SAMPLE, n), replace=False))
        self.sample_vectors = np.ascontiguousarray(vectors[self.sample])  # gathered once, not per query
        self.build_s = time.perf_counter() - started

    def catch_up(self, vectors: np.ndarray) -> None:
        """Add the rows appended to the catalog since the last call."""
        if len(vectors) > self.indexed:
            added = vectors[self.indexed :]
            self.index.add(self._augmented(added))
            longer = np.flatnonzero(np.linalg.norm(added, axis=1) > self.max_norm) + self.indexed
            self.oversized = np.concatenate([self.oversized, longer.astype(np.int64)])
            self.indexed = len(vectors)

    def search(self, user_vector: np.ndarray, k: int) -> np.ndarray:
        query = np.append(user_vector, 0.0).astype(np.float32)[None]
        rows = self.index.search(query, k)[1][0]
        return rows[rows >= 0].astype(np.int64)

    def _augmented(self, vectors: np.ndarray) -> np.ndarray:
        """Rows with the extra coordinate sqrt(M² − |x|²) (0 for a later row longer than M, which the
        index may then miss: ``oversized`` keeps those, and they are always scored exactly)."""
        norms = np.linalg.norm(vectors, axis=1)
        extra = np.sqrt(np.maximum(self.max_norm**2 - norms**2, 0.0))
        return np.ascontiguousarray(np.hstack([vectors, extra[:, None]]), dtype=np.float32)


class Retrieval:
    """Exact or approximate retrieval over ``catalog`` (borrowed), chosen by its size at construction."""

    def __init__(self, catalog: ItemCatalog, *, ann_min_items: int, nprobe: int = 128) -> None:
        self.catalog = catalog
        self._index: _Index | None = None
        if len(catalog) >= ann_min_items:
            self._index = _Index(catalog.vectors, nprobe)
            log.info("ANN index over %d items built in %.1f s", self._index.built, self._index.build_s)

    @property
    def approximate(self) -> bool:
        return self._index is not None

    def scores(self, user_vector: np.ndarray, *, search: int = SEARCH_SIZE) -> UserScores:
        """The user's logits and log-partition over the current snapshot. ``search``: rows an approximate
        index returns (at least ``SEARCH_SIZE``): a caller that will ask ``top`` for k rows past e excluded
        ones passes k + e, so that one index search serves both."""
        vectors = self.catalog.vectors
        if self._index is None:
            exact = vectors @ user_vector
            return UserScores(user_vector, vectors, float(logsumexp(exact)), exact)
        self._index.catch_up(vectors)
        nearest = self._index.search(user_vector, max(search, SEARCH_SIZE))
        nearest = nearest[nearest < len(vectors)]
        log_z = self._estimated_log_partition(vectors, user_vector, nearest[:PARTITION_TOP])
        return UserScores(user_vector, vectors, log_z, None, nearest)

    def top(self, scores: UserScores, k: int, excluded: np.ndarray) -> np.ndarray:
        """Rows of the ``k`` highest logits, best first, never one of ``excluded`` (ascending, as recommend
        sorts them once for every source)."""
        if scores.exact is not None:
            return top_rows(scores.exact, k, excluded)
        assert self._index is not None and scores.nearest is not None
        found = scores.nearest
        if k + len(excluded) > len(found):
            found = self._index.search(scores.user_vector, k + len(excluded))
        oversized = self._index.oversized
        rows = np.union1d(found, oversized) if len(oversized) else found  # the index's rows are distinct
        keep = rows[~contained(rows, excluded) & (rows < len(scores.vectors))]
        logits = scores.logits(keep)
        order = np.argsort(-logits, kind="stable")[:k]
        return keep[order]

    def _estimated_log_partition(
        self, vectors: np.ndarray, user_vector: np.ndarray, top: np.ndarray
    ) -> float:
        """log(Σ exp over ``top`` and the rows added since the build, exactly + the sample's mean over
        the other built rows times their number)."""
        index = self._index
        assert index is not None
        added = np.arange(index.built, len(vectors), dtype=np.int64)
        head = np.union1d(top, added) if len(added) else top  # the index's rows are distinct
        in_tail = ~_members(index.sample, head)
        rest = index.built - int(np.count_nonzero(head < index.built))
        parts = [vectors[head] @ user_vector]
        if in_tail.any() and rest > 0:
            tail = (index.sample_vectors @ user_vector)[in_tail]
            parts.append(np.array([logsumexp(tail) + np.log(rest / int(in_tail.sum()))]))
        return float(logsumexp(np.concatenate(parts)))


def _members(sorted_rows: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Which of ``sorted_rows`` (ascending) are in ``rows``: a binary search per row of the (short)
    ``rows``, not a sort of both as ``np.isin`` does (20,000 sample rows against ~300, per request)."""
    found = np.zeros(len(sorted_rows), dtype=bool)
    at = np.searchsorted(sorted_rows, rows)
    inside = at < len(sorted_rows)
    at, rows = at[inside], rows[inside]
    found[at[sorted_rows[at] == rows]] = True
    return found


def contained(rows: np.ndarray, sorted_rows: np.ndarray) -> np.ndarray:
    """Which of ``rows`` are in ``sorted_rows`` (ascending): ``np.isin`` by binary search, without its
    sort of both arrays (recommend drops the user's excluded rows from every candidate source with it)."""
    if not len(sorted_rows):
        return np.zeros(len(rows), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_rows, rows), len(sorted_rows) - 1)
    return sorted_rows[at] == rows


def top_rows(scores: np.ndarray, k: int, excluded: np.ndarray) -> np.ndarray:
    """Rows of the ``k`` highest scores, best first, never one of ``excluded`` (argpartition: O(N))."""
    scores = np.array(scores, dtype=np.float32)
    scores[excluded] = -np.inf
    k = min(k, len(scores) - len(np.unique(excluded)))
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    part = np.argpartition(-scores, k - 1)[:k]
    return part[np.argsort(-scores[part], kind="stable")]
