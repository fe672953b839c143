"""Calibration of ``click_probability``: Platt scaling on the softmax log-score, fitted on validation.

The model's raw output is a score per item. Its log-softmax score is ``z_i = s_i - logsumexp_j(r_j)``, where
``s_i`` is the item's full (re-ranked) logit and ``r_j`` the retrieval logits of the whole catalog: the
model's own estimate of log P(next item = i | history). Training makes that estimate sharp, not honest
(dropout is off at serving, the re-ranker re-scores a shortlist, the data drifts), so serving reports

    click_probability_i = sigmoid(a * z_i + b)

with ``(a, b)`` fitted on validation cases by binary log-loss over every (case, catalog item) pair: the
real next item is the positive, every other item a negative. A calibrated model's probabilities over the
catalog then sum to about 1, and the mean of a shown list equals its hit rate. With an empty history the
history-free prior logits take the place of both ``s`` and ``r``.

This module is numpy-only (the service imports ``click_probabilities`` and ``log_softmax_scores``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Calibration:
    slope: float = 1.0
    intercept: float = 0.0
    method: str = "platt-on-log-softmax"
    fitted_on: str = "none"
    cases: int = 0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict | None) -> Calibration:
        """The manifest's ``calibration`` entry; an export without one is served uncalibrated (a=1, b=0)."""
        if not data:
            return cls()
        return cls(
            **{k: data[k] for k in ("slope", "intercept", "method", "fitted_on", "cases") if k in data}
        )


def logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    top = x.max(axis=axis, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=axis, keepdims=True))).squeeze(axis)


def log_softmax_scores(logits: np.ndarray, partition_logits: np.ndarray) -> np.ndarray:
    """``z = logits - logsumexp(partition_logits)`` along the last axis (partition: [..., N])."""
    return np.asarray(logits, dtype=np.float64) - logsumexp(partition_logits)[..., None]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable for any x: exp(-log(1 + e^-x)), three ufuncs (half the time of a two-branch
    ``where`` on a predict's 100 candidates, which the service computes for every request)."""
    return np.exp(-np.logaddexp(0.0, -x))


def click_probabilities(z: np.ndarray, calibration: Calibration) -> np.ndarray:
    """sigmoid(a * z + b), numerically stable for any z."""
    return _sigmoid(calibration.slope * np.asarray(z, dtype=np.float64) + calibration.intercept)


def _log_loss(x: np.ndarray, ys: np.ndarray) -> float:
    """Mean binary log-loss of sigmoid(x) against labels ``ys``, stable for any x."""
    return float((np.logaddexp(0.0, x) - ys * x).mean())


def fit_platt(
    z: np.ndarray, positive: np.ndarray, allowed: np.ndarray, steps: int = 200
) -> tuple[float, float]:
    """(a, b) minimising the binary log-loss of sigmoid(a z + b) over the ``allowed`` pairs.

    ``z``, ``positive`` and ``allowed`` are [n, N]; Newton's method on the two parameters (convex), each
    step halved until the loss falls: a plain Newton step diverges when the scores are sharp (z far below
    0 makes sigmoid(z) ≈ 0 everywhere, the Hessian ≈ 0 and the first step enormous)."""
    zs = np.asarray(z, dtype=np.float64)[allowed]
    ys = np.asarray(positive, dtype=np.float64)[allowed]
    a, b = 1.0, 0.0
    x = a * zs + b
    loss = _log_loss(x, ys)
    for _ in range(steps):
        p = _sigmoid(x)
        g = p - ys
        w = np.maximum(p * (1.0 - p), 1e-12)
        grad = np.array([(g * zs).sum(), g.sum()])
        hess = np.array([[(w * zs * zs).sum(), (w * zs).sum()], [(w * zs).sum(), w.sum()]])
        step = np.linalg.solve(hess + 1e-9 * np.eye(2), grad)
        for _ in range(60):
            trial_x = (a - step[0]) * zs + (b - step[1])
            trial = _log_loss(trial_x, ys)
            if trial <= loss:
                break
            step = step / 2.0
        else:
            break  # no step lowers the loss: (a, b) is the minimum to float precision
        a, b, x, loss = a - step[0], b - step[1], trial_x, trial
        if np.abs(step).max() < 1e-9:
            break
    return float(a), float(b)
