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
    scorer: Scorer, cases: Sequence[Case], candidates: np.ndarray, num_items: int, batch: int = 128
) -> dict[str, float]:
    """Rank each case's target among ``candidates`` minus the items already in its history."""
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
    return rank_metrics(
        scores, np.concatenate([r[1] for r in results]), np.concatenate([r[2] for r in results])
    )


def popularity_scorer(split: Split, num_items: int) -> Scorer:
    counts = np.bincount(np.concatenate([s.items for s in split.train]), minlength=num_items).astype(
        np.float32
    )
    return lambda histories: np.tile(counts, (len(histories), 1))


def evaluate_model(scorer: Scorer, split: Split, num_items: int) -> dict[str, dict[str, float]]:
    """Warm test metrics (full ranking over training items) and cold-item metrics."""
    return {
        "warm": evaluate_cases(scorer, split.test, split.train_items, num_items),
        "cold": evaluate_cases(scorer, split.cold_cases, split.cold_items, num_items),
    }


METRIC_KEYS = ("HR@10", "NDCG@10", "MRR", "AUC")


def format_table(rows: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown table: one row per model, warm metrics then cold AUC / NDCG@10."""
    head = "| model | " + " | ".join(METRIC_KEYS) + " | cold AUC | cold NDCG@10 |"
    lines = [head, "|" + "---|" * (len(METRIC_KEYS) + 3)]
    for name, res in rows.items():
        warm = " | ".join(f"{res['warm'][k]:.4f}" for k in METRIC_KEYS)
        lines.append(f"| {name} | {warm} | {res['cold']['AUC']:.4f} | {res['cold']['NDCG@10']:.4f} |")
    return "\n".join(lines)
