"""Retrieval over the catalog: the rows with the largest inner product with a user vector, and the log
of the softmax partition over the whole catalog (the normaliser of ``click_probability``).

Below ``ann_min_items`` rows both are exact numpy (one matrix-vector product). From there on an
approximate index answers: faiss IVF-Flat (4·√N lists, k-means trained on a sample, ``ann_nprobe`` lists
scanned per query) over vectors augmented so that the nearest in Euclidean distance is the largest inner
product (each item gains a coordinate sqrt(M² − |x|²), M 1.1 × the largest norm at build time, a query
a 0). Indexes on the inner product itself, IVF and the graph indexes (HNSW in faiss, hnswlib, usearch),
recalled far less of the top 300 (``loadtests/ann_choice.py``, ``docs/benchmarks.md``).

One probe per query answers both. A range search with no radius returns every row of the scanned lists
with its distance, from which its logit follows exactly (|q|² + M² − d) / 2, up to float32 rounding.
Rows counted exactly besides them: the ``HEAVY_ROWS`` built rows of largest norm (where the largest
logits of a catalog live, and the rows an IVF probe misses most dearly), the rows added since the build,
and later rows longer than M (kept out of the index). The rest of the partition, the other built rows of
the unscanned lists, is the mean over a fixed uniform sample of them times their number. Retrieval's
candidates are the exactly counted rows of largest logit.

The index is built with the model (at load); rows the catalog gains later (``POST /v1/items``, the
catalog sync) are added to it at the next query, and a row whose vector changed is taken out of the
built rows' accounting (index, heavy rows, sample) and indexed again by its new vector, as if added.
Every row the index proposes is re-scored with the catalog's current vector.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import numpy as np

from models.calibration import logsumexp
from service.catalog import Changes, ItemCatalog, backing

log = logging.getLogger(__name__)

SEARCH_SIZE = 600
"""Rows one probe proposes to retrieval (its top 300, with room for a user's seen items)."""
HEAVY_ROWS = 3_000
"""Built rows of the largest norms, counted exactly in every partition."""
PARTITION_SAMPLE = 5_000
"""Uniform sample of the other built rows, for the unscanned lists' share of the partition."""
TRAIN_PER_LIST = 64
"""k-means training points per inverted list (a sample of the catalog)."""
ADD_CHUNK = 100_000
"""Rows augmented and added to the index at a time when it is built."""
EXACT_CHUNK_LOGITS = 1_000_000
"""Logits of a batch's users scored in one product at most: 4 MB, and three times as much in float64 while
their log-partitions are summed (a batch of 64 over 199,999 items would otherwise take 250 MB at once)."""
EVERYTHING = float(np.finfo(np.float32).max)
"""A range-search radius that keeps every row of the scanned lists."""


@dataclass(frozen=True, slots=True)
class UserScores:
    """One user vector against one catalog snapshot: logits of any rows, and the log-partition."""

    user_vector: np.ndarray
    vectors: np.ndarray  # the snapshot's [N, D]
    log_partition: float
    exact: np.ndarray | None  # every row's logit, when they were computed (exact retrieval)
    nearest: np.ndarray | None = None  # the probe's candidate rows, distinct (approximate retrieval)

    @property
    def size(self) -> int:
        """Rows covered (an item added later is not)."""
        return len(self.exact) if self.exact is not None else len(self.vectors)

    def logits(self, rows: np.ndarray) -> np.ndarray:
        if self.exact is not None:
            return self.exact[rows]
        return self.vectors[rows] @ self.user_vector


class _Index:
    """A faiss IVF-Flat index over a snapshot's augmented rows (faiss id = row number), and the rows and
    sample the partition counts besides the scanned lists."""

    def __init__(self, snapshot: Changes, nprobe: int) -> None:
        """Built over ``snapshot``'s vectors (``ItemCatalog.changes_since(0)``), at its revision."""
        import faiss

        # One thread: a request's search is small, and idle OpenMP workers spin on the cores the ranker
        # and the event loop need (measured: 138% CPU at 50 requests/s with the default threads).
        faiss.omp_set_num_threads(1)
        started = time.perf_counter()
        vectors = snapshot.vectors
        n, dim = vectors.shape
        nlist = max(1, int(4 * np.sqrt(n)))
        norms = np.linalg.norm(vectors, axis=1)
        self.max_norm = 1.1 * float(norms.max())
        rng = np.random.default_rng(0)
        train = rng.choice(n, size=min(n, TRAIN_PER_LIST * nlist), replace=False)
        self.index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim + 1), dim + 1, nlist)
        self.index.train(self._augmented(vectors[train], norms[train]))
        self.index.nprobe = min(nprobe, nlist)
        for start in range(0, n, ADD_CHUNK):  # chunks: no second copy of the whole catalog at the peak
            chunk = slice(start, start + ADD_CHUNK)
            self.index.add(self._augmented(vectors[chunk], norms[chunk]))
        built_lists = self._built_lists(n)
        self.revision = snapshot.revision  # the catalog revision taken in
        self.indexed = n  # catalog rows taken in: built, added later, or oversized
        self.added = np.empty(0, dtype=np.int64)  # rows indexed after the build, and their lists
        self.added_lists = np.empty(0, dtype=np.int64)
        self.oversized = np.empty(0, dtype=np.int64)  # later rows longer than M: kept out of the index
        self.built_lists = built_lists
        self.moved = np.zeros(n, dtype=bool)  # built rows re-indexed since (their vector changed)

        heavy = np.arange(n)
        if n > HEAVY_ROWS:
            heavy = np.sort(np.argpartition(-norms, HEAVY_ROWS - 1)[:HEAVY_ROWS])
        self.heavy, self.heavy_lists = heavy, built_lists[heavy]
        self.heavy_vectors = np.ascontiguousarray(vectors[heavy])
        others = np.setdiff1d(np.arange(n), heavy, assume_unique=True)
        self.others_per_list = np.bincount(built_lists[others], minlength=nlist)  # what the sample stands for
        self.sample = np.sort(rng.choice(others, size=min(PARTITION_SAMPLE, len(others)), replace=False))
        self.sample_lists = built_lists[self.sample]
        self.sample_vectors = np.ascontiguousarray(vectors[self.sample])  # gathered once, not per query
        self.build_s = time.perf_counter() - started

    def catch_up(self, changes: Changes) -> None:
        """Take in the rows appended to the catalog and the rows whose vector changed since the revision last
        taken in: both are indexed by their current vector (a changed row first leaves the accounting it was
        in). Every catalog row stays counted once: ``others_per_list`` + heavy + added + oversized."""
        vectors = changes.vectors
        changed = changes.updated[changes.updated < self.indexed]  # rows appended since are new anyway
        if len(changed):
            self._forget(changed)
        rows = np.concatenate([changed, np.arange(self.indexed, len(vectors))])
        if len(rows):
            norms = np.linalg.norm(vectors[rows], axis=1)
            fits = norms <= self.max_norm
            augmented = self._augmented(vectors[rows[fits]], norms[fits])
            self.added = np.concatenate([self.added, rows[fits]])
            self.added_lists = np.concatenate([self.added_lists, self._lists_of(augmented)])
            self.index.add_with_ids(augmented, rows[fits])
            self.oversized = np.concatenate([self.oversized, rows[~fits]])
        self.indexed, self.revision = len(vectors), changes.revision

    def _forget(self, rows: np.ndarray) -> None:
        """Take ``rows`` (ascending, each once) out of the index and out of whatever counts them: the rows
        added or oversized, the heavy rows, or the other built rows and their sample."""
        self.index.remove_ids(rows)
        added = ~np.isin(self.added, rows)
        self.added, self.added_lists = self.added[added], self.added_lists[added]
        self.oversized = self.oversized[~np.isin(self.oversized, rows)]
        built = rows[rows < len(self.moved)]
        built = built[~self.moved[built]]  # still counted as built rows
        self.moved[built] = True
        others = built[~contained(built, self.heavy)]
        heavy = contained(self.heavy, built)
        self.heavy, self.heavy_lists = self.heavy[~heavy], self.heavy_lists[~heavy]
        self.heavy_vectors = self.heavy_vectors[~heavy]
        np.subtract.at(self.others_per_list, self.built_lists[others], 1)
        sampled = contained(self.sample, others)
        self.sample, self.sample_lists = self.sample[~sampled], self.sample_lists[~sampled]
        self.sample_vectors = self.sample_vectors[~sampled]

    def probe(self, user_vector: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, float]:
        """The ``k`` exactly counted rows of largest logit (distinct, unordered), and the log-partition."""
        query = np.append(user_vector, 0.0).astype(np.float32)[None]
        to_lists, lists = self.index.quantizer.search(query, self.index.nprobe)
        _, distances, rows = self.index.range_search_preassigned(query, EVERYTHING, lists, to_lists)
        scanned = np.zeros(self.index.nlist, dtype=bool)
        scanned[lists[0]] = True
        heavy_out = ~scanned[self.heavy_lists]
        elsewhere = np.concatenate([self.added[~scanned[self.added_lists]], self.oversized])
        rows = np.concatenate([rows, self.heavy[heavy_out], elsewhere])
        logits = np.concatenate(
            [
                (float(user_vector @ user_vector) + self.max_norm**2 - distances.astype(np.float64)) / 2,
                (self.heavy_vectors @ user_vector)[heavy_out],
                vectors[elsewhere] @ user_vector,
            ]
        )
        parts = [logits]
        in_tail = ~scanned[self.sample_lists]
        tail_rows = int(self.others_per_list[~scanned].sum())
        if tail_rows and in_tail.any():
            tail = (self.sample_vectors @ user_vector)[in_tail]
            parts.append(np.array([logsumexp(tail) + np.log(tail_rows / int(in_tail.sum()))]))
        log_z = float(logsumexp(np.concatenate(parts)))
        return rows[largest(logits, k)], log_z

    def _built_lists(self, n: int) -> np.ndarray:
        """Each built row's list, read off the inverted lists (no second assignment pass)."""
        import faiss

        lists, invlists = np.empty(n, dtype=np.int64), self.index.invlists
        for number in range(self.index.nlist):
            if size := invlists.list_size(number):
                lists[faiss.rev_swig_ptr(invlists.get_ids(number), size)] = number
        return lists

    def _lists_of(self, augmented: np.ndarray) -> np.ndarray:
        return self.index.quantizer.assign(augmented, 1)[:, 0].astype(np.int64)

    def _augmented(self, vectors: np.ndarray, norms: np.ndarray) -> np.ndarray:
        """Rows with the extra coordinate sqrt(M² − |x|²) (each at most M long: longer later rows are
        ``oversized`` and never indexed)."""
        extra = np.sqrt(np.maximum(self.max_norm**2 - norms**2, 0.0))
        return np.hstack([vectors, extra[:, None]], dtype=np.float32)


@dataclass(slots=True)
class _Columns:
    """The transpose of the catalog's vectors buffer ``source``, as far as it is ``filled``: a view of its
    first N columns is a snapshot's ``vectors.T`` with contiguous rows. While the catalog only appends (the
    same buffer), new rows are transposed into the columns past every view handed out, so an upsert costs
    what it adds, not a new copy of the catalog (97 ms at 100,000 items); a new buffer (an update, the
    catalog's growth) starts a new transpose."""

    source: np.ndarray
    buffer: np.ndarray  # [D, len(source)] float32
    filled: int = 0


class Retrieval:
    """Exact or approximate retrieval over ``catalog`` (borrowed), chosen by its size at construction."""

    def __init__(self, catalog: ItemCatalog, *, ann_min_items: int, nprobe: int = 128) -> None:
        self.catalog = catalog
        self._index: _Index | None = None
        self._columns: _Columns | None = None
        self._columns_lock = threading.Lock()  # the event loop and the inference thread may both score
        if len(catalog) >= ann_min_items:
            self._index = _Index(catalog.changes_since(0), nprobe)
            log.info("ANN index over %d items built in %.1f s", self._index.indexed, self._index.build_s)

    @property
    def approximate(self) -> bool:
        return self._index is not None

    def scores(self, user_vector: np.ndarray, *, search: int = SEARCH_SIZE) -> UserScores:
        """The user's logits and log-partition over the current snapshot. ``search``: candidate rows an
        approximate probe keeps (at least ``SEARCH_SIZE``): a caller that will ask ``top`` for k rows past
        e excluded ones passes k + e, so that one probe serves both."""
        if self._index is None:
            return self.exact_scores(user_vector[None])[0]
        if self.catalog.revision != self._index.revision:
            self._index.catch_up(self.catalog.changes_since(self._index.revision))
        vectors = self.catalog.vectors
        nearest, log_z = self._index.probe(user_vector, vectors, max(search, SEARCH_SIZE))
        return UserScores(user_vector, vectors, log_z, None, nearest)

    def exact_scores(self, user_vectors: np.ndarray) -> list[UserScores]:
        """``scores`` of many user vectors ``[B, D]`` over the current snapshot, exactly, a product per
        ``EXACT_CHUNK_LOGITS`` logits (``service.inference``: the inference thread's batch), whatever the
        catalog's size."""
        vectors = self.catalog.vectors
        columns = self._columns_of(vectors)
        users_at_once = max(1, EXACT_CHUNK_LOGITS // max(len(vectors), 1))
        out: list[UserScores] = []
        for start in range(0, len(user_vectors), users_at_once):
            chunk = user_vectors[start : start + users_at_once]
            exact = chunk @ columns  # [b, N]
            log_z = logsumexp(exact, axis=1)
            out += [
                UserScores(u, vectors, float(z), logits)
                for u, z, logits in zip(chunk, log_z.tolist(), exact, strict=True)
            ]
        return out

    def _columns_of(self, vectors: np.ndarray) -> np.ndarray:
        """``vectors.T`` [D, N], each row contiguous (``_Columns``). OpenBLAS multiplies the 2–8 user
        vectors of a batch by it 2–8× faster than by the transposed view (AMD EPYC, one thread): 17–61
        against 146–161 µs over 1,682 items, 0.5–1.2 against 2.1–3.0 ms over 20,000, 13–16 against
        28–32 ms over 200,000, where it is most of a batch's time (``docs/benchmarks.md`` has the
        measurement). It costs a second copy of the vectors while retrieval is exact, below
        ``ann_min_items`` (at most about 110 MB at 128 wide)."""
        source = backing(vectors)
        with self._columns_lock:
            columns = self._columns
            if columns is None or columns.source is not source:
                columns = _Columns(source, np.empty((vectors.shape[1], len(source)), np.float32))
                self._columns = columns
            if len(vectors) > columns.filled:  # rows appended since: past every view handed out
                columns.buffer[:, columns.filled : len(vectors)] = vectors[columns.filled :].T
                columns.filled = len(vectors)
            return columns.buffer[:, : len(vectors)]

    def top(self, scores: UserScores, k: int, excluded: np.ndarray) -> np.ndarray:
        """Rows of the ``k`` highest logits, best first, never one of ``excluded`` (ascending, as recommend
        sorts them once for every source)."""
        if scores.exact is not None:
            return top_rows(scores.exact, k, excluded)
        assert self._index is not None and scores.nearest is not None
        found = scores.nearest
        if k + len(excluded) > len(found):
            found, _ = self._index.probe(scores.user_vector, scores.vectors, k + len(excluded))
        keep = found[~contained(found, excluded)]
        logits = scores.logits(keep)
        order = np.argsort(-logits, kind="stable")[:k]
        return keep[order]


def largest(values: np.ndarray, k: int, stride: int = 8) -> np.ndarray:
    """Positions of the ``k`` largest ``values`` (all of them when there are fewer), unordered. A full
    argpartition of a probe's ~26,000 logits costs 0.3 ms; one of the values at or above a threshold taken
    from every ``stride``-th value (a few times k of them) costs a fifth of that, and the result is the
    same: once k values reach the threshold, the k largest all do."""
    if k >= len(values):
        return np.arange(len(values))
    sub = values[::stride]
    keep = 2 * (k // stride) + 1
    if keep < len(sub):
        candidates = np.flatnonzero(values >= np.partition(sub, len(sub) - keep)[len(sub) - keep])
        if len(candidates) >= k:
            return candidates[np.argpartition(values[candidates], len(candidates) - k)[len(candidates) - k :]]
    return np.argpartition(values, len(values) - k)[len(values) - k :]


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
    if k > len(scores) - len(excluded):  # only then can a row excluded twice leave room for more
        k = min(k, len(scores) - len(np.unique(excluded)))
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    part = np.argpartition(-scores, k - 1)[:k]
    return part[np.argsort(-scores[part], kind="stable")]
