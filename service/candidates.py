"""Candidate gathering for ``/v1/recommend``: catalog rows from every source, as one union for the ranker.

Sources, with a history (at least one catalog item in the merged stored + context events):

- ``retrieval``: the sequence model's vector retrieval (computed by the ranker, which owns the model);
- ``covisit``: the co-visitation sets ("what followed what", ``service.store``) of the user's last
  ``covisit_sources`` distinct items, each normalised to sum 1 and weighted 1/k for the k-th latest item,
  merged, best ``covisit_candidates`` (a set read from Redis is reused for ``covisit_cache_s``);
- ``fresh``: the newest ``fresh_candidates`` fresh items that are in the catalog;
- ``trending``: the ``trending_candidates`` most trending items.

The trending and fresh lists are the same for every user: read once, they are kept as catalog rows and
reused for ``lists_cache_s``, so a request only drops its user's excluded rows from them.

Without a history: trending items up to ``top_k``, topped up from the model's history-free ``prior``, plus
the fresh items. Excluded (seen) items and items not in the catalog are dropped from every source. The
Redis-backed lists are read in one pipelined round trip under the store's deadline; when it fails, the
answer is built from the other sources and the failure is returned for the caller to flag ``degraded``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field

import numpy as np

from service.catalog import ItemCatalog
from service.metrics import CANDIDATES, COVISIT_CACHE, labelled
from service.redis_conn import StoreUnavailable
from service.retrieval import contained
from service.store import TRENDING_OVERFETCH_MAX, HistoryStore, SourceLists, trending_depth

PriorRows = Callable[[int, np.ndarray], Awaitable[np.ndarray]]
"""``prior(k, excluded_rows)``: the ``k`` best rows by the history-free prior, never an excluded one."""

_HITS, _MISSES = COVISIT_CACHE.labels(result="hit"), COVISIT_CACHE.labels(result="miss")
FOLLOWER_CACHE_ITEMS = 100_000
"""Items whose followers a replica keeps at most (about 1 KB each at the default ``covisit_size``)."""


@dataclass(frozen=True, slots=True)
class Followers:
    """One item's co-visitation set as catalog rows and weights, each divided by the whole set's total (its
    items outside the catalog included): an estimate of "what follows this item", so a popular item's long
    tail cannot drown a rarer item's strong links."""

    rows: np.ndarray  # int64
    weights: np.ndarray  # float64

    @classmethod
    def of(cls, entries: Sequence[tuple[str, float]], catalog: ItemCatalog) -> Followers:
        """From a store's list of (item id, score)."""
        scores = np.fromiter((score for _, score in entries), dtype=np.float64, count=len(entries))
        total = float(scores.sum())
        if total <= 0:
            return NO_FOLLOWERS
        rows = catalog.index_of([item_id for item_id, _ in entries])
        known = rows >= 0
        return cls(rows[known], scores[known] / total)


NO_FOLLOWERS = Followers(np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64))


@dataclass(frozen=True, slots=True)
class Covisitation:
    """The merged co-visitation score of every catalog row linked to the user's latest items: the sum of
    its weights in their ``Followers``, the k-th latest item's counting 1/k."""

    rows: np.ndarray  # int64, ascending, each once
    scores: np.ndarray  # float64, > 0

    @classmethod
    def merge(cls, followers: Sequence[Followers]) -> Covisitation:
        """``followers`` of the latest item first."""
        if not followers:
            return NO_COVISITATION
        rows = np.concatenate([f.rows for f in followers])
        if not len(rows):
            return NO_COVISITATION
        ranks = np.repeat(np.arange(1.0, len(followers) + 1.0), [len(f.rows) for f in followers])
        weights = np.concatenate([f.weights for f in followers]) / ranks
        order = np.argsort(rows, kind="stable")
        rows, weights = rows[order], weights[order]
        first = np.empty(len(rows), dtype=bool)  # each row's first place
        first[0] = True
        np.not_equal(rows[1:], rows[:-1], out=first[1:])
        starts = np.flatnonzero(first)
        return cls(rows[starts], np.add.reduceat(weights, starts))

    def __len__(self) -> int:
        return len(self.rows)

    def of(self, rows: np.ndarray) -> np.ndarray:
        """The score of each of ``rows`` (0: not linked, or -1: not a catalog row)."""
        if not len(self.rows):
            return np.zeros(len(rows))
        at = np.minimum(np.searchsorted(self.rows, rows), len(self.rows) - 1)
        return np.where(self.rows[at] == rows, self.scores[at], 0.0)

    def best(self, k: int, excluded_rows: np.ndarray) -> np.ndarray:
        """The ``k`` rows with the highest scores, best first (ties: the lower row), never one of
        ``excluded_rows`` (ascending)."""
        allowed = ~contained(self.rows, excluded_rows)
        rows, scores = self.rows[allowed], self.scores[allowed]
        return rows[np.argsort(-scores, kind="stable")[:k]]


NO_COVISITATION = Covisitation(np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64))


class FollowerCache:
    """Each item's ``Followers`` as read from the store, reused for ``ttl_s`` (0: never). Co-visitation is
    an aggregate over all users that moves slowly, and a request reads the sets of its user's latest items:
    under load most are read again within a second by other requests. At most ``max_items`` are kept."""

    def __init__(self, ttl_s: float, max_items: int = FOLLOWER_CACHE_ITEMS) -> None:
        self.ttl_s = ttl_s
        self.max_items = max_items
        self._entries: dict[str, tuple[float, Followers]] = {}

    def split(self, items: Sequence[str]) -> tuple[dict[str, Followers], list[str]]:
        """(the cached followers of ``items``, the items to read)."""
        if self.ttl_s <= 0 or not items:
            return {}, list(items)
        now = time.monotonic()
        found: dict[str, Followers] = {}
        missing: list[str] = []
        for item_id in items:
            entry = self._entries.get(item_id)
            if entry is not None and entry[0] > now:
                found[item_id] = entry[1]
            else:
                missing.append(item_id)
        _HITS.inc(len(found))
        _MISSES.inc(len(missing))
        return found, missing

    def put(self, followers: dict[str, Followers]) -> None:
        if self.ttl_s <= 0 or not followers:
            return
        now = time.monotonic()
        if len(self._entries) + len(followers) > self.max_items:
            self._entries = {k: v for k, v in self._entries.items() if v[0] > now}
            if len(self._entries) + len(followers) > self.max_items:
                self._entries.clear()
        expires = now + self.ttl_s
        for item_id, f in followers.items():
            self._entries[item_id] = (expires, f)


class ListCache:
    """The store's trending and fresh lists as catalog rows (list order, items outside the catalog dropped),
    reused for ``ttl_s`` (0: never): they are the same for every user, and converting a few hundred ids to
    rows on every recommend cost more than the rest of its candidate gathering. Rows stay valid: the
    catalog only appends rows."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[str, tuple[float, int, np.ndarray]] = {}  # name → (expires, entries read, rows)

    def get(self, name: str, n: int) -> np.ndarray | None:
        """The rows of list ``name`` if it was read with at least its top ``n`` entries within the TTL."""
        entry = self._entries.get(name)
        if entry is not None and entry[0] > time.monotonic() and entry[1] >= n:
            return entry[2]
        return None

    def put(self, name: str, read: int, rows: np.ndarray) -> None:
        """Keep ``rows``, from the top ``read`` entries of list ``name``."""
        if self.ttl_s > 0:
            self._entries[name] = (time.monotonic() + self.ttl_s, read, rows)


def last_distinct(item_ids: Sequence[str], n: int) -> list[str]:
    """The ``n`` latest distinct ids of a time-ordered list, latest first."""
    out: list[str] = []
    for item_id in reversed(item_ids):
        if len(out) == n:
            break
        if item_id not in out:
            out.append(item_id)
    return out


@dataclass(frozen=True, slots=True)
class Gathered:
    rows: np.ndarray  # int64 catalog rows, each once, in source order
    store_error: StoreUnavailable | None  # the source read failed: the answer is degraded
    covisit: Covisitation  # of the user's latest items


@dataclass(kw_only=True)
class CandidateSources:
    """Gathers the candidate rows of one recommend request (see the module docstring), and the merged
    co-visitation that the ranker blends into predict and recommend."""

    catalog: ItemCatalog
    store: HistoryStore
    covisit_sources: int = 3
    covisit_candidates: int = 100
    fresh_candidates: int = 20
    trending_candidates: int = 10
    covisit_cache_s: float = 0.0
    lists_cache_s: float = 0.0
    _followers: FollowerCache = field(init=False, repr=False)
    _lists: ListCache = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._followers = FollowerCache(self.covisit_cache_s)
        self._lists = ListCache(self.lists_cache_s)

    async def gather(
        self,
        retrieved: np.ndarray | None,
        *,
        recent: Sequence[str],
        exclude: Collection[str],
        excluded_rows: np.ndarray,
        top_k: int,
        use_store: bool,
        prior: PriorRows,
    ) -> Gathered:
        """``retrieved`` is None without a history; ``recent`` the user's item ids, oldest first;
        ``excluded_rows`` their catalog rows, ascending; ``use_store`` False skips the Redis read (the history
        read already failed)."""
        with_history = retrieved is not None
        sources = last_distinct(recent, self.covisit_sources) if with_history else []
        trending_n = self.trending_candidates if with_history else 2 * top_k
        # Read past the top trending_n to make up for excluded items; with the cache on, as far as any
        # request may need, so the rows read serve every user until they expire.
        overfetch = TRENDING_OVERFETCH_MAX if self._lists.ttl_s > 0 else len(exclude)
        trending = self._lists.get("trending", trending_depth(trending_n, len(exclude)))
        fresh = self._lists.get("fresh", 0)
        cached, missing = self._followers.split(sources)
        lists, error = SourceLists([], [], []), None
        if use_store:
            try:
                lists = await self.store.candidate_lists(
                    missing,
                    trending=0 if trending is not None else trending_n,
                    exclude=overfetch,
                    fresh=fresh is None,
                )
            except StoreUnavailable as exc:
                error = exc
        read = error is None and use_store
        covisit = self._merged(sources, cached, missing, lists.covisit if read else None)
        if trending is None:
            trending = self.catalog.known_rows(lists.trending)
            if read:
                self._lists.put("trending", trending_depth(trending_n, overfetch), trending)
        if fresh is None:
            fresh = self.catalog.known_rows(lists.fresh)
            if read:
                self._lists.put("fresh", 0, fresh)

        parts: dict[str, np.ndarray] = {}
        if with_history:
            parts["retrieval"] = retrieved
            if sources:
                parts["covisit"] = covisit.best(self.covisit_candidates, excluded_rows)
            parts["trending"] = _first_allowed(trending, excluded_rows, self.trending_candidates)
        else:
            parts["trending"] = _first_allowed(trending, excluded_rows, top_k)
            if len(parts["trending"]) < top_k:
                parts["prior"] = await prior(
                    top_k - len(parts["trending"]), np.r_[excluded_rows, parts["trending"]]
                )
        parts["fresh"] = _first_allowed(fresh, excluded_rows, self.fresh_candidates)

        for source, rows in parts.items():
            labelled(CANDIDATES, source).observe(len(rows))
        rows = np.concatenate([np.asarray(r, dtype=np.int64) for r in parts.values()])
        _, first = np.unique(rows, return_index=True)
        rows = rows[np.sort(first)]
        labelled(CANDIDATES, "union").observe(len(rows))
        return Gathered(rows=rows, store_error=error, covisit=covisit)

    async def covisit_of(self, recent: Sequence[str]) -> Covisitation:
        """The merged co-visitation of a user whose item ids, oldest first, are ``recent`` (at most one
        round trip, none when every set is cached; raises StoreUnavailable)."""
        sources = last_distinct(recent, self.covisit_sources)
        cached, missing = self._followers.split(sources)
        read = (await self.store.candidate_lists(missing, trending=0, fresh=False)).covisit if missing else []
        return self._merged(sources, cached, missing, read)

    def _merged(
        self,
        sources: Sequence[str],
        cached: dict[str, Followers],
        missing: Sequence[str],
        read: Sequence[Sequence[tuple[str, float]]] | None,
    ) -> Covisitation:
        """The sets of ``sources`` from the cache and from ``read`` (the store's lists of ``missing``, which
        join the cache; None: the read failed, and those sets count as empty)."""
        if read is not None:
            fresh = {i: Followers.of(entries, self.catalog) for i, entries in zip(missing, read, strict=True)}
            self._followers.put(fresh)
            cached = {**cached, **fresh}
        return Covisitation.merge([cached.get(item_id, NO_FOLLOWERS) for item_id in sources])


def _first_allowed(rows: np.ndarray, excluded_rows: np.ndarray, k: int) -> np.ndarray:
    """The first ``k`` of ``rows`` that are not in ``excluded_rows`` (ascending)."""
    if k <= 0 or not len(rows):
        return np.empty(0, dtype=np.int64)
    rows = rows[: k + len(excluded_rows)]  # at most len(excluded_rows) of them can be dropped
    return rows[~contained(rows, excluded_rows)][:k]
