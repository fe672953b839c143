"""Co-visitation in the offline harness: the service's "what followed what" sets, built from training
sequences, so that leave-one-out ranks items the way ``/v1/recommend`` and ``/v1/predict`` do.

The service (``service/lua/lib_aggregates.lua``, ``service.candidates``, ``service.ranking``):

- each stored event adds ``2^((t - ref) / half_life) / d`` to the set of each of the up to ``window``
  distinct items the user had ``d`` positions before it (never the item itself); a set keeps its best
  ``size`` members;
- a user's co-visitation score of an item: each of the ``sources`` latest distinct items' set, normalised
  to sum 1, weighted 1/k for the k-th latest, summed;
- the served probability is the model's click probability times ``e^{β · score}``, renormalised per user.

Here the sets are trimmed to ``size`` once, after all events (the service trims as it goes, so an item can
lose a place there that it would keep here); ``ref`` cancels in the normalisation. The renormalisation is
one number per user, so the ranking is by ``log click_probability + β · score``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from models.calibration import Calibration, click_probabilities, log_softmax_scores
from models.evaluate import Scorer
from models.sequences import UserSequence
from service.candidates import last_distinct
from service.settings import Settings

_SERVED = Settings.model_fields
SERVED_WEIGHT: float = _SERVED["covisit_weight"].default
"""β of the served blend (``CLICKRANK_COVISIT_WEIGHT``'s default)."""


@dataclass(frozen=True)
class CovisitTable:
    """Per source item row: the rows that followed it and their normalised weights (summing to 1)."""

    followers: list[tuple[np.ndarray, np.ndarray]]
    sources: int

    @classmethod
    def from_sequences(
        cls,
        sequences: Sequence[UserSequence],
        num_items: int,
        *,
        window: int = _SERVED["covisit_window"].default,
        size: int = _SERVED["covisit_size"].default,
        sources: int = _SERVED["covisit_sources"].default,
        half_life_s: float = _SERVED["trending_half_life_s"].default,
    ) -> CovisitTable:
        latest = max((float(s.timestamps[-1]) for s in sequences if len(s)), default=0.0)
        sets: list[dict[int, float]] = [{} for _ in range(num_items)]
        for seq in sequences:
            items = seq.items.tolist()
            recency = np.exp2((seq.timestamps - latest) / half_life_s).tolist()
            for p in range(1, len(items)):
                target, used = items[p], {items[p]}
                for d in range(1, min(window, p) + 1):
                    before = items[p - d]
                    if before not in used:
                        used.add(before)
                        weights = sets[before]
                        weights[target] = weights.get(target, 0.0) + recency[p] / d
        followers = []
        for weights in sets:
            best = sorted(weights.items(), key=lambda entry: -entry[1])[:size]
            rows = np.array([row for row, _ in best], dtype=np.int64)
            w = np.array([weight for _, weight in best], dtype=np.float64)
            followers.append((rows, w / w.sum() if len(w) else w))
        return cls(followers, sources)

    def scores(self, history: UserSequence, num_items: int) -> np.ndarray:
        """[num_items]: the user's co-visitation score of every item (0 for items linked to none)."""
        out = np.zeros(num_items)
        for k, row in enumerate(last_distinct(history.items.tolist(), self.sources), start=1):
            rows, weights = self.followers[row]
            out[rows] += weights / k
        return out


ModelScores = Callable[[Sequence[UserSequence]], tuple[np.ndarray, np.ndarray]]
"""histories → (served, retrieval) logits [n, N], as ``RecModel.scores``."""


def served_scorer(
    scores: ModelScores, table: CovisitTable, calibration: Calibration, weight: float, num_items: int
) -> Scorer:
    """The served ranking: log click_probability + ``weight`` × co-visitation score."""

    def score(histories: Sequence[UserSequence]) -> np.ndarray:
        served, retrieval = scores(histories)
        p = click_probabilities(log_softmax_scores(served, retrieval), calibration)
        boost = np.stack([table.scores(h, num_items) for h in histories])
        return np.log(np.maximum(p, 1e-300)) + weight * boost

    return score
