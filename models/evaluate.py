"""The evaluation harness: leave-one-out by time, full ranking over all items, and cold items.

Every model is judged through the same ``Scorer`` interface: histories in, a score for every catalog
item out. Warm rankings run over all items seen in training (so the ID-only baseline is not punished
for random vectors of items it never saw); the cold evaluation ranks each withheld item a user really
rated against every other withheld item the user did not rate, from text alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from models.sequences import UserSequence

Scorer = Callable[[Sequence[UserSequence]], np.ndarray]
"""histories → scores [n, num_items]"""


@dataclass(frozen=True)
class Case:
    history: UserSequence
    target: int


@dataclass(frozen=True)
class Split:
    train: list[UserSequence]
    valid: list[Case]
    test: list[Case]
    cold_items: np.ndarray
    cold_cases: list[Case]
    train_items: np.ndarray  # items with at least one training interaction


def make_split(
    sequences: list[UserSequence], num_items: int, cold_fraction: float, seed: int, max_cold_cases: int = 3000
) -> Split:
    """Withhold ``cold_fraction`` of the items entirely; leave the last two warm events per user out."""
    rng = np.random.default_rng(seed)
    counts = np.bincount(np.concatenate([s.items for s in sequences]), minlength=num_items)
    eligible = np.flatnonzero(counts >= 3)
    cold = np.sort(rng.choice(eligible, size=max(1, int(cold_fraction * len(eligible))), replace=False))
    train, valid, test, cold_cases = [], [], [], []
    for seq in sequences:
        warm = seq.without(cold)
        if len(warm) >= 3:
            train.append(warm.slice(len(warm) - 2))
            valid.append(Case(warm.slice(len(warm) - 2), int(warm.items[-2])))
            test.append(Case(warm.slice(len(warm) - 1), int(warm.items[-1])))
        for pos in np.flatnonzero(np.isin(seq.items, cold)):
            history = seq.slice(pos).without(cold)
            if len(history):
                cold_cases.append(Case(history, int(seq.items[pos])))
    if len(cold_cases) > max_cold_cases:
        keep = rng.choice(len(cold_cases), size=max_cold_cases, replace=False)
        cold_cases = [cold_cases[i] for i in np.sort(keep)]
    train_items = np.flatnonzero(np.bincount(np.concatenate([s.items for s in train]), minlength=num_items))
    return Split(train, valid, test, cold, cold_cases, train_items)


def rank_metrics(scores: np.ndarray, targets: np.ndarray, allowed: np.ndarray) -> dict[str, float]:
    """Full-ranking metrics. ``allowed`` [n, N] marks each case's candidate items (target included).

    Ties count half (the expected rank under random tie-breaking), so a constant scorer gets AUC 0.5.
    """
    rows = np.arange(len(targets))
    target_scores = scores[rows, targets][:, None]
    greater = ((scores > target_scores) & allowed).sum(1)
    ties = ((scores == target_scores) & allowed).sum(1) - 1
    rank = 1.0 + greater + 0.5 * ties
    negatives = allowed.sum(1) - 1
    hit = rank <= 10
    return {
        "HR@10": float(hit.mean()),
        "NDCG@10": float(np.where(hit, 1.0 / np.log2(rank + 1.0), 0.0).mean()),
        "MRR": float((1.0 / rank).mean()),
        "AUC": float((1.0 - (rank - 1.0) / np.maximum(negatives, 1)).mean()),
        "cases": len(targets),
    }


def evaluate_cases(
    scorer: Scorer,
    cases: Sequence[Case],
    candidates: np.ndarray,
    num_items: int,
    batch: int = 128,
    item_features: np.ndarray | None = None,
) -> dict[str, float]:
    """Rank each case's target among ``candidates`` minus the items already in its history.

    Beside accuracy: ``coverage@10`` (distinct items in the cases' top 10 / number of candidates) and,
    given ``item_features`` ([num_items, G] genre flags, see ``genre_features``), ``ILD@10`` (mean
    pairwise genre Jaccard distance within each top 10). The top 10 is over the same allowed items
    (candidates minus the history), the target included as in the ranking."""
    cand_mask = np.zeros(num_items, dtype=bool)
    cand_mask[candidates] = True
    results = []
    for start in range(0, len(cases), batch):
        chunk = cases[start : start + batch]
        scores = scorer([c.history for c in chunk])
        allowed = np.tile(cand_mask, (len(chunk), 1))
        targets = np.array([c.target for c in chunk])
        for i, c in enumerate(chunk):
            allowed[i, c.history.items] = False
        allowed[np.arange(len(chunk)), targets] = True
        results.append((scores, targets, allowed))
    scores = np.concatenate([r[0] for r in results])
    allowed = np.concatenate([r[2] for r in results])
    metrics = rank_metrics(scores, np.concatenate([r[1] for r in results]), allowed)
    top = top_k_lists(scores, allowed, 10)
    metrics["coverage@10"] = coverage_at_k(top, len(np.unique(candidates)), 10)
    if item_features is not None:
        metrics["ILD@10"] = intra_list_diversity(top, item_features, 10, metric="jaccard")
    return metrics


def popularity_scorer(split: Split, num_items: int) -> Scorer:
    counts = np.bincount(np.concatenate([s.items for s in split.train]), minlength=num_items).astype(
        np.float32
    )
    return lambda histories: np.tile(counts, (len(histories), 1))


def evaluate_model(
    scorer: Scorer, split: Split, num_items: int, item_features: np.ndarray | None = None
) -> dict[str, dict[str, float]]:
    """Warm test metrics (full ranking over training items) and cold-item metrics."""
    return {
        "warm": evaluate_cases(scorer, split.test, split.train_items, num_items, item_features=item_features),
        "cold": evaluate_cases(
            scorer, split.cold_cases, split.cold_items, num_items, item_features=item_features
        ),
    }


METRIC_KEYS = ("HR@10", "NDCG@10", "MRR", "AUC")
EXTRA_KEYS = ("coverage@10", "ILD@10")
"""Beyond-accuracy columns of ``format_table`` (warm cases): see ``evaluate_cases``."""


def format_table(rows: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown table: one row per model, warm metrics then cold AUC / NDCG@10, then warm coverage@10 and
    ILD@10 where every row has them (tables saved before they existed have not)."""
    extra = [k for k in EXTRA_KEYS if rows and all(k in res["warm"] for res in rows.values())]
    head = "| model | " + " | ".join(METRIC_KEYS) + " | cold AUC | cold NDCG@10 |"
    head += "".join(f" {k} |" for k in extra)
    lines = [head, "|" + "---|" * (len(METRIC_KEYS) + 3 + len(extra))]
    for name, res in rows.items():
        warm = " | ".join(f"{res['warm'][k]:.4f}" for k in METRIC_KEYS)
        more = "".join(f" {res['warm'][k]:.4f} |" for k in extra)
        lines.append(f"| {name} | {warm} | {res['cold']['AUC']:.4f} | {res['cold']['NDCG@10']:.4f} |{more}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ beyond-accuracy metrics


def genre_features(items: Sequence) -> np.ndarray:
    """[N, G] bool genre flags of ``models.data.Item``s (``unknown`` is a genre like any other)."""
    from models.data import GENRES

    column = {g: j for j, g in enumerate(GENRES)}
    out = np.zeros((len(items), len(GENRES)), dtype=bool)
    for i, item in enumerate(items):
        out[i, [column[g] for g in item.genres]] = True
    return out


def top_k_lists(scores: np.ndarray, allowed: np.ndarray, k: int = 10) -> np.ndarray:
    """[n, k] item rows of each case's ``k`` best allowed scores, best first; -1 pads a case with fewer
    than ``k`` allowed items. Tied items inside the list are ordered by row."""
    masked = np.where(allowed, np.asarray(scores, dtype=np.float64), -np.inf)
    k_eff = min(k, masked.shape[1])
    part = np.argpartition(-masked, k_eff - 1, axis=1)[:, :k_eff]
    part_scores = np.take_along_axis(masked, part, 1)
    order = np.lexsort((part, -part_scores), axis=1)
    top = np.take_along_axis(part, order, 1)
    top = np.where(np.isfinite(np.take_along_axis(masked, top, 1)), top, -1)
    if k_eff < k:
        top = np.concatenate([top, np.full((len(top), k - k_eff), -1, dtype=top.dtype)], 1)
    return top


def coverage_at_k(lists: Sequence[Sequence[int]] | np.ndarray, catalog_size: int, k: int = 10) -> float:
    """Catalog coverage: distinct items shown in any list's first ``k`` / ``catalog_size`` (-1 = empty)."""
    shown: set[int] = set()
    for row in lists:
        shown.update(int(i) for i in list(row)[:k] if int(i) >= 0)
    return len(shown) / catalog_size if catalog_size else 0.0


def pairwise_distances(features: np.ndarray, metric: str = "cosine") -> np.ndarray:
    """[n, n] distances between the rows of ``features``.

    ``cosine``: 1 − cos(a, b) (a zero vector is at distance 1 from everything but itself);
    ``jaccard``: 1 − |a ∧ b| / |a ∨ b| of boolean rows (two empty sets are at distance 0).
    """
    if metric == "cosine":
        x = np.asarray(features, dtype=np.float64)
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        unit = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
        dist = 1.0 - unit @ unit.T
        np.fill_diagonal(dist, 0.0)
        return dist
    if metric == "jaccard":
        b = np.asarray(features, dtype=bool).astype(np.float64)
        inter = b @ b.T
        sizes = b.sum(1)
        union = sizes[:, None] + sizes[None, :] - inter
        return np.where(union > 0, 1.0 - inter / np.maximum(union, 1.0), 0.0)
    raise ValueError(f"unknown distance {metric!r} (cosine or jaccard)")


def intra_list_diversity(
    lists: Sequence[Sequence[int]] | np.ndarray, features: np.ndarray, k: int = 10, metric: str = "cosine"
) -> float:
    """Mean over lists (of at least two items) of the mean pairwise distance of the list's first ``k``
    items' feature rows (see ``pairwise_distances``); -1 entries are skipped. NaN if no list qualifies."""
    per_list = []
    for row in lists:
        rows = [int(i) for i in list(row)[:k] if int(i) >= 0]
        if len(rows) < 2:
            continue
        dist = pairwise_distances(features[rows], metric)
        n = len(rows)
        per_list.append(dist[np.triu_indices(n, 1)].mean())
    return float(np.mean(per_list)) if per_list else float("nan")
