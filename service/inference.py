"""What the inference thread runs for one micro-batch: the ranker graph, then, for exact retrieval, every
user vector's logits and log-partition over the catalog in one matrix product.

Per request on the event loop, that product and its log-sum-exp were 7.5 % of a predict's event-loop time
(py-spy, full-size export, ``docs/benchmarks.md``); here they are one ``[B, D] × [D, N]`` product a batch,
with numpy releasing the GIL while it runs. An approximate index is still probed per request on the event
loop (``Retrieval.scores``): its candidates depend on the request, and it takes in new rows as it is
probed, which must not race with a probe of the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from service.retrieval import Retrieval, UserScores
from service.runtime import OnnxModels, RankRequest, RankResult


@dataclass(frozen=True, slots=True)
class Ranked:
    """One request's ranker result, and its user's scores over the catalog when they were computed with
    it (a history, and exact retrieval); None: the caller asks ``Retrieval.scores`` itself."""

    result: RankResult
    scores: UserScores | None


class BatchInference:
    """The micro-batcher's ``infer``: ``models`` and ``retrieval`` are borrowed from the loaded model."""

    def __init__(self, models: OnnxModels, retrieval: Retrieval) -> None:
        self.models = models
        self.retrieval = retrieval

    def __call__(self, requests: Sequence[RankRequest]) -> list[Ranked]:
        results = self.models.rank(requests)
        scored = [i for i, r in enumerate(requests) if len(r.history)]
        scores: list[UserScores | None] = [None] * len(results)
        if scored and not self.retrieval.approximate:
            user_vectors = np.stack([results[i].user_vector for i in scored])
            for i, s in zip(scored, self.retrieval.exact_scores(user_vectors), strict=True):
                scores[i] = s
        return [Ranked(result, s) for result, s in zip(results, scores, strict=True)]
