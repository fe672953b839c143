"""Predict and recommend: stored history + request context → ranker features → batcher → ranked answer.

Pure of HTTP: the app maps the exceptions raised here (``StoreUnavailable`` only where an answer is
impossible without Redis, ``QueueFull``, ``BatcherClosed``) to status codes. When the history read fails
the answer is computed from the request's ``context`` alone and flagged ``degraded``.

The catalog may change at any ``await`` (``POST /v1/items``, the sync task). Its rows are append-only, so
a row found in one snapshot is valid in every later one; the ids and vectors handed to one ranker call
are always read together, from one snapshot.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.calibration import click_probabilities, logsumexp
from service.batcher import MicroBatcher
from service.candidates import NO_COVISITATION, CandidateSources, Covisitation
from service.catalog import ItemCatalog
from service.inference import Ranked
from service.logs import ThrottledLog
from service.metrics import DEGRADED, counted_from_start
from service.redis_conn import StoreUnavailable
from service.retrieval import SEARCH_SIZE, Retrieval, UserScores, top_rows
from service.runtime import OnnxModels, encode_off_loop
from service.schemas.events import ContextEvent, EventRecord
from service.schemas.ranking import CandidateItem, PredictRequest, RecommendRequest
from service.store import HistoryStore
from service.window import Window, build_window, merge_events

log = logging.getLogger("clickrank.ranking")
_degraded_log = ThrottledLog(log)

PREDICT_ROUTE, RECOMMEND_ROUTE = "/v1/predict", "/v1/recommend"
"""The ranker's routes: their answers may be ``degraded`` (``clickrank_degraded_total`` counts both from
start-up), and the admission control sheds them (``service.middleware.MODEL_ROUTES``)."""
counted_from_start(DEGRADED, (PREDICT_ROUTE, RECOMMEND_ROUTE))

EXPLAIN_TOP = 5
"""History items reported per candidate when ``explain`` is asked."""
PRIOR_CHUNK = 1024
"""Candidates per ranker request when the history-free prior is computed over the whole catalog."""
PRIOR_WAVE = 16
"""Such requests queued at once: a million items are 977 requests, more than the batcher's queue holds."""


class ModelOutputError(RuntimeError):
    """The ranker returned non-finite numbers: a broken export, never a valid answer."""


def influences(deltas: np.ndarray, item_ids: Sequence[str], top: int = EXPLAIN_TOP) -> list[dict[str, Any]]:
    """The ``top`` history items with the largest effect on a candidate, largest first. ``deltas[i]`` is
    the candidate's probability with the whole history minus its probability with every event of
    ``item_ids[i]`` left out; weights are the deltas divided by the sum of their absolute values (signed:
    a negative weight means the item made the candidate less likely)."""
    total = float(np.abs(deltas).sum())
    weights = deltas / total if total > 0 else np.zeros_like(deltas)
    best = np.argsort(-np.abs(weights), kind="stable")[:top].tolist()
    return [{"item_id": item_ids[i], "weight": round(float(weights[i]), 4)} for i in best]


def shown(probabilities: np.ndarray, top_k: int | None) -> np.ndarray:
    """Indices of the candidates answered, by click probability (ties keep request order), cut at top_k."""
    return np.argsort(-probabilities, kind="stable")[: top_k or len(probabilities)]


def rank_predictions(
    item_ids: Sequence[str] | Mapping[int, str],
    probabilities: np.ndarray,
    order: np.ndarray,
    explained: Sequence[list[dict[str, Any]]] | None = None,
) -> list[dict[str, Any]]:
    """The candidates at ``order`` (``shown``), rank 1 first, as the ``Prediction`` fields, with the
    influences of each (aligned with ``order``) when explained. ``item_ids`` maps a candidate's index to
    its id (at least those of ``order``).

    Plain dicts, serialised once with the whole answer (``service.routes.predict``), never built as
    pydantic objects: validating an answer the ranker built costs a fifth of the HTTP floor's time."""
    rows = order.tolist()
    ranked = enumerate(zip(rows, probabilities[rows].tolist(), strict=True), start=1)
    if explained is None:
        return [{"item_id": item_ids[j], "click_probability": p, "rank": rank} for rank, (j, p) in ranked]
    return [
        {"item_id": item_ids[j], "click_probability": p, "rank": rank, "influences": explained[rank - 1]}
        for rank, (j, p) in ranked
    ]


@dataclass(kw_only=True)
class Ranker:
    """Serves predict and recommend from the store, the catalog and the batched ranker (all borrowed)."""

    models: OnnxModels
    catalog: ItemCatalog
    retrieval: Retrieval
    store: HistoryStore
    batcher: MicroBatcher
    sources: CandidateSources
    history_length: int
    retrieval_size: int
    covisit_weight: float = 0.0
    _prior: tuple[int, np.ndarray] | None = field(default=None, init=False, repr=False)  # revision, logits

    async def predict(self, req: PredictRequest) -> dict[str, Any]:
        """The ``PredictResponse`` fields, JSON-ready."""
        route = PREDICT_ROUTE
        events, window, _, degraded = await self._history(req.user_id, req.context, route, with_seen=False)
        item_ids, rows, vectors, unknown = await self._candidates(req.candidates)
        predictions: list[dict[str, Any]] = []
        if item_ids:
            logits, scores = await self._logits(window, vectors)
            model_probabilities = probabilities = self._probabilities(logits, scores)
            if self.covisit_weight > 0 and len(window) and not degraded:
                try:
                    covisit = await self.sources.covisit_of([e.item_id for e in events])
                except StoreUnavailable as exc:
                    covisit, degraded = NO_COVISITATION, self._degraded(route, exc)
                probabilities = self._with_covisit(rows, probabilities, covisit, scores)
            order = shown(probabilities, req.top_k)
            explained = (
                await self._explain(events, window, vectors[order], model_probabilities[order])
                if req.explain
                else None
            )
            predictions = rank_predictions(item_ids, probabilities, order, explained)
        answered = self._answered(req.user_id, window, degraded)
        return {**answered, "predictions": predictions, "unknown_items": unknown}

    async def recommend(self, req: RecommendRequest) -> dict[str, Any]:
        """The ``RecommendResponse`` fields, JSON-ready."""
        route = RECOMMEND_ROUTE
        with_seen = req.exclude_seen
        events, window, seen, degraded = await self._history(
            req.user_id, req.context, route, with_seen=with_seen
        )
        exclude = (seen or set()) | {e.item_id for e in events} if req.exclude_seen else set()

        excluded = np.sort(self.catalog.known_rows(list(exclude)))  # ascending, as every source needs
        retrieved = scores = None
        if len(window):
            # Retrieval: the items closest to the user vector (exact or ANN); the other sources join below.
            probe = await self._probe(window)
            scores = self._scores_of(probe, search=self.retrieval_size + len(excluded))
            retrieved = self.retrieval.top(scores, self.retrieval_size, excluded)
        found = await self.sources.gather(
            retrieved,
            recent=[e.item_id for e in events],
            exclude=exclude,
            excluded_rows=excluded,
            top_k=req.top_k,
            use_store=not degraded,
            prior=self._prior_rows,
        )
        if found.store_error is not None:
            degraded = self._degraded(route, found.store_error)
        rows = found.rows

        items: list[dict[str, Any]] = []
        if len(rows):
            # Rows are append-only: those found above are valid in the catalog as it is now.
            item_ids, vectors = self.catalog.item_ids, self.catalog.vectors
            candidate_vectors = vectors[rows]
            logits, scores = await self._logits(window, candidate_vectors, scores)
            model_probabilities = probabilities = self._probabilities(logits, scores)
            if len(window):
                probabilities = self._with_covisit(rows, probabilities, found.covisit, scores)
            order = shown(probabilities, req.top_k)
            explained = (
                await self._explain(events, window, candidate_vectors[order], model_probabilities[order])
                if req.explain
                else None
            )
            # Ids of the shown candidates only: in a large catalog each lookup is a cache miss.
            ids = dict(zip(order.tolist(), [item_ids[r] for r in rows[order].tolist()], strict=True))
            items = rank_predictions(ids, probabilities, order, explained)
        return {**self._answered(req.user_id, window, degraded), "items": items}

    async def _explain(
        self,
        events: Sequence[EventRecord],
        window: Window,
        candidate_vectors: np.ndarray,
        probabilities: np.ndarray,
    ) -> list[list[dict[str, Any]]]:
        """Each candidate's influences (``influences``): for every distinct item of the window, the
        ranker's calibrated probability with all of that item's events left out (the window rebuilt as if
        they had never happened, so an older event may slide in), against ``probabilities``, the
        probabilities with the whole history. One ranker request per item, batched together; the
        co-visitation blend is not attributed."""
        distinct = list(dict.fromkeys(window.item_ids))
        if not distinct:
            return [[] for _ in range(len(candidate_vectors))]
        variants = [
            build_window([e for e in events if e.item_id != item], self.catalog, self.history_length)
            for item in distinct
        ]
        results = await asyncio.gather(*(self._rank(v, candidate_vectors) for v in variants))
        without = np.stack(
            [
                self._probabilities(r.result.logits, await self._scores(v, r))
                for v, r in zip(variants, results, strict=True)
            ]
        )  # [items, candidates]
        deltas = probabilities[None, :] - without
        return [influences(deltas[:, c], distinct) for c in range(len(candidate_vectors))]

    async def user_vector(self, events: Sequence[EventRecord]) -> np.ndarray | None:
        """The user vector the ranker computes from these events (None: none of them is a catalog item)."""
        window = build_window(events, self.catalog, self.history_length)
        return (await self._probe(window)).result.user_vector if len(window) else None

    async def _probe(self, window: Window) -> Ranked:
        """The ranker run for the window's user vector alone (one zero candidate)."""
        return await self._rank(window, np.zeros((1, self.catalog.dim), np.float32))

    def _scores_of(self, ranked: Ranked, search: int = SEARCH_SIZE) -> UserScores:
        """The user's scores over the catalog: those computed with the batch (exact retrieval), else a
        probe of the index (``Retrieval.scores``, ``search`` candidate rows)."""
        if ranked.scores is not None:
            return ranked.scores
        return self.retrieval.scores(ranked.result.user_vector, search=search)

    def _answered(self, user_id: str, window: Window, degraded: bool) -> dict[str, Any]:
        """The ``RankedAnswer`` fields of an answer."""
        return {
            "user_id": user_id,
            "model_version": self.models.version,
            "history_length": len(window),
            "degraded": degraded,
        }

    async def _prior_rows(self, k: int, excluded: np.ndarray) -> np.ndarray:
        """The ``k`` best rows by the history-free prior, never one of ``excluded``."""
        return top_rows(await self.prior_logits(), k, excluded)

    async def _logits(
        self, window: Window, candidate_vectors: np.ndarray, scores: UserScores | None = None
    ) -> tuple[np.ndarray, UserScores]:
        """The candidates' logits, and the scores they are normalised over (``scores`` when the caller has
        them). With a history and a model without re-ranker (``OnnxModels.dot_logits``) the graph's logit is
        the dot product of the user vector and the item vector: one ranker request for the user vector,
        none over the candidates. Otherwise the ranker runs over the candidates."""
        if len(window) and self.models.dot_logits:
            if scores is None:
                scores = self._scores_of(await self._probe(window))
            return candidate_vectors @ scores.user_vector, scores
        ranked = await self._rank(window, candidate_vectors)
        return ranked.result.logits, scores if scores is not None else await self._scores(window, ranked)

    async def _scores(self, window: Window, ranked: Ranked) -> UserScores:
        """What the probabilities are normalised over: the catalog's retrieval logits under the user
        vector, or the history-free prior's logits without a history."""
        if len(window):
            return self._scores_of(ranked)
        prior = await self.prior_logits()
        return UserScores(ranked.result.user_vector, self.catalog.vectors, float(logsumexp(prior)), prior)

    def _probabilities(self, logits: np.ndarray, scores: UserScores) -> np.ndarray:
        """Calibrated click probabilities of the candidates' ``logits`` (``models.calibration``): each
        logit's log-softmax against the catalog (``scores``), through the model's fitted Platt scaling."""
        z = np.asarray(logits, dtype=np.float64) - scores.log_partition
        return click_probabilities(z, self.models.calibration)

    def _with_covisit(
        self,
        rows: np.ndarray,
        probabilities: np.ndarray,
        covisit: Covisitation,
        scores: UserScores,
    ) -> np.ndarray:
        """The model's distribution times exp(β · co-visitation score), renormalised over the catalog;
        ``rows`` are the candidates' catalog rows (-1: not in the catalog, never co-visited).

        Only the co-visited items change, so the new normaliser is 1 + Σ_j p_j (e^{β cv_j} − 1) over them
        (p_j from their retrieval logits): predict and recommend give the same number for an item."""
        if self.covisit_weight <= 0 or not len(covisit):
            return probabilities
        known = covisit.rows < scores.size  # an item added since ``scores`` were read: skip
        linked_p = click_probabilities(
            scores.logits(covisit.rows[known]) - scores.log_partition, self.models.calibration
        )
        norm = 1.0 + float(np.dot(linked_p, np.expm1(self.covisit_weight * covisit.scores[known])))
        boost = np.exp(self.covisit_weight * covisit.of(rows))
        return np.minimum(probabilities * boost / norm, 1.0)

    async def prior_logits(self) -> np.ndarray:
        """The ranker's logits for every catalog item with an empty history (the prior of a user without
        history). Cached with the catalog revision it covers; a later revision recomputes only the rows
        appended or updated since (``ItemCatalog.changes_since``: the whole of a million-item catalog
        takes seconds, so it is computed once, when the model is built)."""
        if self._prior is None:
            changes = self.catalog.changes_since(0)
            rows, logits = np.arange(len(changes.vectors)), np.zeros(len(changes.vectors), dtype=np.float32)
        else:
            revision, old_logits = self._prior
            changes = self.catalog.changes_since(revision)
            if changes.revision == revision:
                return old_logits
            n = len(old_logits)
            rows = np.concatenate([changes.updated, np.arange(n, len(changes.vectors))])
            logits = np.concatenate([old_logits, np.zeros(len(changes.vectors) - n, dtype=np.float32)])
        vectors = changes.vectors
        empty = build_window([], self.catalog, 0)
        chunks = [rows[i : i + PRIOR_CHUNK] for i in range(0, len(rows), PRIOR_CHUNK)]
        for wave in range(0, len(chunks), PRIOR_WAVE):  # a bounded number in the batcher's queue at once
            batch = chunks[wave : wave + PRIOR_WAVE]
            results = await asyncio.gather(*(self._rank(empty, vectors[chunk]) for chunk in batch))
            for chunk, ranked in zip(batch, results, strict=True):
                logits[chunk] = ranked.result.logits
        self._prior = (changes.revision, logits)
        return logits

    async def _rank(self, window: Window, candidate_vectors: np.ndarray) -> Ranked:
        ranked = await self.batcher.submit(window.request(candidate_vectors))
        result = ranked.result
        if not (np.isfinite(result.logits).all() and np.isfinite(result.user_vector).all()):
            raise ModelOutputError(f"ranker.onnx of model {self.models.version} returned non-finite scores")
        return ranked

    async def _history(
        self, user_id: str, context: Sequence[ContextEvent], route: str, *, with_seen: bool
    ) -> tuple[list[EventRecord], Window, set[str] | None, bool]:
        """(stored + context events, their window, seen-set, degraded); an unreachable store gives the
        context alone, no seen-set, and degraded."""
        try:
            stored, seen = await self.store.history(user_id, self.history_length, with_seen=with_seen)
            degraded = False
        except StoreUnavailable as exc:
            stored, seen, degraded = [], None, self._degraded(route, exc)
        events = merge_events(stored, context)
        return events, build_window(events, self.catalog, self.history_length), seen, degraded

    @staticmethod
    def _degraded(route: str, exc: Exception) -> bool:
        DEGRADED.labels(route=route).inc()
        _degraded_log.log(
            logging.WARNING, route, "%s answered without stored history (degraded): %s", route, exc
        )
        return True

    async def _candidates(
        self, candidates: Sequence[str | CandidateItem]
    ) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
        """(scored ids, their catalog rows (-1: encoded here), their vectors, unknown ids). Duplicates are
        scored once, first occurrence wins.

        Known items use their catalog vector; unknown items given with text are encoded on the fly
        (not added to the catalog); unknown items without text are reported, not scored.
        """
        given: dict[str, str | None] = {}
        if all(type(c) is str for c in candidates):  # ids only, the common case
            given = dict.fromkeys(candidates)  # type: ignore[arg-type]
        else:
            for c in candidates:
                item_id, text = (c, None) if isinstance(c, str) else (c.item_id, c.text)
                given.setdefault(item_id, text)
        ids = list(given)
        catalog_vectors = self.catalog.vectors  # one snapshot for the rows and the vectors
        rows = self.catalog.index_of(ids)
        if rows.min(initial=0) >= 0:  # every candidate in the catalog, the common case
            return ids, rows, catalog_vectors.take(rows, axis=0), []
        outside = np.flatnonzero(rows < 0).tolist()
        unknown = [ids[k] for k in outside if given[ids[k]] is None]
        new = [k for k in outside if given[ids[k]] is not None]
        scored = np.flatnonzero(rows >= 0)
        if new:
            scored = np.sort(np.concatenate([scored, np.asarray(new, dtype=np.int64)]))
        vectors = np.empty((len(scored), catalog_vectors.shape[1]), dtype=np.float32)
        in_catalog = rows[scored] >= 0
        vectors[in_catalog] = catalog_vectors[rows[scored[in_catalog]]]
        if new:  # in request order, as they sit in ``scored``
            vectors[~in_catalog] = await encode_off_loop(self.models, [given[ids[k]] or "" for k in new])
        return [ids[k] for k in scored.tolist()], rows[scored], vectors, unknown
