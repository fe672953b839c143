"""Candidate gathering for ``/v1/recommend``: catalog rows from every source, as one union for the ranker.

Sources, with a history (at least one catalog item in the merged stored + context events):

- ``retrieval``: the sequence model's vector retrieval (computed by the ranker, which owns the model);
- ``covisit``: the co-visitation sets ("what followed what", ``service.store``) of the user's last
  ``covisit_sources`` distinct items, each normalised to sum 1 and weighted 1/k for the k-th latest item,
  merged, best ``covisit_candidates``;
- ``fresh``: the newest ``fresh_candidates`` fresh items that are in the catalog;
- ``trending``: the ``trending_candidates`` most trending items.

Without a history: trending items up to ``top_k``, topped up from the model's history-free ``prior``, plus
the fresh items. Excluded (seen) items and items not in the catalog are dropped from every source. The
Redis-backed lists are read in one pipelined round trip under the store's deadline; when it fails, the
answer is built from the other sources and the failure is returned for the caller to flag ``degraded``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass

import numpy as np

from service.catalog import ItemCatalog
from service.metrics import CANDIDATES
from service.redis_conn import StoreUnavailable
from service.store import HistoryStore, SourceLists

PriorRows = Callable[[int, np.ndarray], Awaitable[np.ndarray]]
"""``prior(k, excluded_rows)``: the ``k`` best rows by the history-free prior, never an excluded one."""


@dataclass(frozen=True, slots=True)
class Gathered:
    rows: np.ndarray  # int64 catalog rows, each once, in source order
    store_error: StoreUnavailable | None  # the source read failed: the answer is degraded
    covisit: dict[str, float]  # merged co-visitation score of each item linked to the user's latest items


def covisit_scores(lists: Sequence[Sequence[tuple[str, float]]]) -> dict[str, float]:
    """Merged co-visitation score of every item in the sources' lists (latest source first).

    Each list is normalised by its total weight (an estimate of "what follows this item"), so a popular
    item's long tail cannot drown a rarer item's strong links; the k-th latest source counts 1/k."""
    scores: dict[str, float] = {}
    for k, entries in enumerate(lists, start=1):
        total = sum(score for _, score in entries)
        if total <= 0:
            continue
        for item_id, score in entries:
            scores[item_id] = scores.get(item_id, 0.0) + score / total / k
    return scores


def merge_covisit(lists: Sequence[Sequence[tuple[str, float]]], exclude: Collection[str]) -> list[str]:
    """Items of the sources' co-visitation lists by merged score (``covisit_scores``), best first."""
    scores = covisit_scores(lists)
    return sorted((i for i in scores if i not in exclude), key=lambda item_id: -scores[item_id])


def last_distinct(item_ids: Sequence[str], n: int) -> list[str]:
    """The ``n`` latest distinct ids of a time-ordered list, latest first."""
    out: list[str] = []
    for item_id in reversed(item_ids):
        if len(out) == n:
            break
        if item_id not in out:
            out.append(item_id)
    return out


@dataclass(frozen=True, kw_only=True)
class CandidateSources:
    """Gathers the candidate rows of one recommend request (see the module docstring)."""

    catalog: ItemCatalog
    store: HistoryStore
    covisit_sources: int = 3
    covisit_candidates: int = 100
    fresh_candidates: int = 20
    trending_candidates: int = 10

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
        ``use_store`` False skips the Redis read (the history read already failed)."""
        with_history = retrieved is not None
        sources = last_distinct(recent, self.covisit_sources) if with_history else []
        trending_n = self.trending_candidates if with_history else 2 * top_k
        lists, error = SourceLists([], [], []), None
        if use_store:
            try:
                lists = await self.store.candidate_lists(sources, trending=trending_n, exclude=len(exclude))
            except StoreUnavailable as exc:
                error = exc

        parts: dict[str, np.ndarray] = {}
        if with_history:
            parts["retrieval"] = retrieved
            if sources:
                parts["covisit"] = self._rows(merge_covisit(lists.covisit, exclude), self.covisit_candidates)
            parts["trending"] = self._rows(self._allowed(lists.trending, exclude), self.trending_candidates)
        else:
            trending = self._rows(self._allowed(lists.trending, exclude), top_k)
            parts["trending"] = trending
            if len(trending) < top_k:
                parts["prior"] = await prior(top_k - len(trending), np.r_[excluded_rows, trending])
        parts["fresh"] = self._rows(self._allowed(lists.fresh, exclude), self.fresh_candidates)

        for source, rows in parts.items():
            CANDIDATES.labels(source=source).observe(len(rows))
        rows = np.concatenate([np.asarray(r, dtype=np.int64) for r in parts.values()])
        _, first = np.unique(rows, return_index=True)
        rows = rows[np.sort(first)]
        CANDIDATES.labels(source="union").observe(len(rows))
        return Gathered(rows=rows, store_error=error, covisit=covisit_scores(lists.covisit))

    async def covisit_of(self, recent: Sequence[str]) -> dict[str, float]:
        """The merged co-visitation scores for a user whose item ids, oldest first, are ``recent`` (one
        round trip; raises StoreUnavailable)."""
        sources = last_distinct(recent, self.covisit_sources)
        if not sources:
            return {}
        lists = await self.store.candidate_lists(sources, trending=0, fresh=False)
        return covisit_scores(lists.covisit)

    @staticmethod
    def _allowed(item_ids: Sequence[str], exclude: Collection[str]) -> list[str]:
        return [item_id for item_id in item_ids if item_id not in exclude]

    def _rows(self, item_ids: Sequence[str], k: int) -> np.ndarray:
        """Catalog rows of the first ``k`` ids that are in the catalog."""
        if not item_ids or k <= 0:
            return np.empty(0, dtype=np.int64)
        rows = self.catalog.index_of(item_ids)
        return rows[rows >= 0][:k]
