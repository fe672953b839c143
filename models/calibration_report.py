"""Calibration of predicted probabilities against observed outcomes: expected calibration error and
the reliability diagram. Pure numpy (matplotlib only to draw)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ReliabilityBin:
    lower: float  # smallest predicted probability in the bin (equal-mass) or the bin's edge (equal-width)
    upper: float
    count: int
    mean_predicted: float
    observed_rate: float


def reliability_bins(
    probs: np.ndarray, outcomes: np.ndarray, n_bins: int = 15, strategy: str = "equal-mass"
) -> list[ReliabilityBin]:
    """Non-empty bins of (predicted probability, 0/1 outcome) pairs.

    ``equal-mass``: the pairs sorted by probability are cut into ``n_bins`` groups of (nearly) equal
    size (``np.array_split``), so every bin holds about len/n_bins predictions even when they crowd
    near 0; equal probabilities may straddle two bins. ``equal-width``: [0, 1] cut into ``n_bins``
    intervals [i/n, (i+1)/n) (the last one closed).
    """
    p = np.asarray(probs, dtype=np.float64).ravel()
    y = np.asarray(outcomes, dtype=np.float64).ravel()
    if p.shape != y.shape:
        raise ValueError(f"{p.size} probabilities but {y.size} outcomes")
    if n_bins < 1:
        raise ValueError("n_bins must be at least 1")
    if not p.size:
        return []
    if strategy == "equal-mass":
        order = np.argsort(p, kind="stable")
        groups = [g for g in np.array_split(order, min(n_bins, p.size)) if g.size]
        edges = [(float(p[g].min()), float(p[g].max())) for g in groups]
    elif strategy == "equal-width":
        idx = np.minimum((np.clip(p, 0.0, 1.0) * n_bins).astype(np.int64), n_bins - 1)
        groups = [np.flatnonzero(idx == b) for b in range(n_bins)]
        edges = [(b / n_bins, (b + 1) / n_bins) for b in range(n_bins)]
        groups, edges = zip(*[(g, e) for g, e in zip(groups, edges, strict=True) if g.size], strict=True)
    else:
        raise ValueError(f"unknown binning {strategy!r} (equal-mass or equal-width)")
    return [
        ReliabilityBin(lo, hi, int(g.size), float(p[g].mean()), float(y[g].mean()))
        for g, (lo, hi) in zip(groups, edges, strict=True)
    ]


def expected_calibration_error(bins: list[ReliabilityBin]) -> float:
    """ECE = Σ_b (n_b / N) · |mean predicted_b − observed rate_b| (0 for no predictions)."""
    total = sum(b.count for b in bins)
    if not total:
        return 0.0
    return float(sum(b.count * abs(b.mean_predicted - b.observed_rate) for b in bins) / total)


def calibration_summary(
    probs: np.ndarray, outcomes: np.ndarray, n_bins: int = 15, strategy: str = "equal-mass"
) -> dict:
    """Mean predicted probability, observed rate, their ratio, ECE and the bins (JSON-ready)."""
    p = np.asarray(probs, dtype=np.float64).ravel()
    y = np.asarray(outcomes, dtype=np.float64).ravel()
    bins = reliability_bins(p, y, n_bins, strategy)
    mean_p = float(p.mean()) if p.size else float("nan")
    rate = float(y.mean()) if y.size else float("nan")
    return {
        "predictions": int(p.size),
        "mean_probability": mean_p,
        "observed_rate": rate,
        "ratio": mean_p / rate if rate > 0 else float("inf") if mean_p > 0 else float("nan"),
        "ece": expected_calibration_error(bins),
        "bins_strategy": strategy,
        "n_bins": n_bins,
        "bins": [asdict(b) for b in bins],
    }


def plot_reliability(bins: list[ReliabilityBin], path: Path, title: str = "reliability diagram") -> None:
    """Observed rate against mean predicted probability per bin (log-log: probabilities are small),
    with the diagonal of perfect calibration and each bin's count beside its marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    xs = np.array([b.mean_predicted for b in bins])
    ys = np.array([b.observed_rate for b in bins])
    positive = np.concatenate([xs[xs > 0], ys[ys > 0]])
    lo = float(positive.min()) / 2 if positive.size else 1e-4
    hi = min(1.0, float(positive.max()) * 2) if positive.size else 1.0
    ax.plot([lo, hi], [lo, hi], "--", color="grey", label="perfect calibration")
    shown = ys > 0
    ax.plot(xs[shown], ys[shown], "o-", label="bins (observed > 0)")
    if (~shown).any():
        ax.plot(xs[~shown], np.full((~shown).sum(), lo), "v", color="C3", label="bins with no hit (at floor)")
    for b in bins:
        ax.annotate(str(b.count), (b.mean_predicted, max(b.observed_rate, lo)), fontsize=7, alpha=0.6)
    ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi), title=title)
    ax.set(xlabel="mean predicted click probability", ylabel="observed hit rate")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
