"""Calibration of click_probability: Platt scaling on the log-softmax score (models/calibration.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.calibration import (
    Calibration,
    click_probabilities,
    fit_platt,
    log_softmax_scores,
    logsumexp,
)


def test_fit_platt_recovers_the_generating_parameters() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(-6.0, 2.0, size=(400, 500))
    true = Calibration(slope=0.7, intercept=-0.4)
    positive = rng.random(z.shape) < click_probabilities(z, true)
    allowed = np.ones_like(positive)
    allowed[:, :50] = False  # pairs outside ``allowed`` must not count
    positive[:, :50] = True
    a, b = fit_platt(z, positive, allowed)
    assert a == pytest.approx(0.7, abs=0.05) and b == pytest.approx(-0.4, abs=0.25)


def test_fit_platt_converges_on_sharp_scores() -> None:
    """Scores 20x too sharp (z far below 0, where a plain Newton step from a=1 diverged to a ≈ 5e10):
    the fit finds the generating parameters on the sharp scale, a = 0.7 / 20."""
    rng = np.random.default_rng(2)
    z = rng.normal(-6.0, 2.0, size=(400, 500))
    positive = rng.random(z.shape) < click_probabilities(z, Calibration(slope=0.7, intercept=-0.4))
    a, b = fit_platt(20.0 * z, positive, np.ones_like(positive))
    assert a == pytest.approx(0.7 / 20.0, abs=0.05 / 20.0) and b == pytest.approx(-0.4, abs=0.25)


def test_calibrated_probabilities_sum_to_one_over_the_catalog_when_the_softmax_is_honest() -> None:
    """A softmax that *is* the data's distribution needs no change: a≈1, b≈0 and the sum over items ≈ 1."""
    rng = np.random.default_rng(1)
    logits = rng.normal(0.0, 1.5, size=(2000, 400))  # many items: p small, sigmoid(z) ≈ e^z
    z = log_softmax_scores(logits, logits)
    targets = np.array([rng.choice(400, p=np.exp(row)) for row in z])
    positive = np.zeros_like(z, dtype=bool)
    positive[np.arange(len(targets)), targets] = True
    a, b = fit_platt(z, positive, np.ones_like(positive))
    assert a == pytest.approx(1.0, abs=0.1) and b == pytest.approx(0.0, abs=0.3)
    sums = click_probabilities(z, Calibration(a, b)).sum(1)
    assert sums.mean() == pytest.approx(1.0, abs=0.05)


def test_probabilities_are_finite_and_monotone_for_extreme_scores() -> None:
    z = np.array([-1e6, -50.0, -3.0, 0.0, 50.0, 1e6])
    p = click_probabilities(z, Calibration(slope=1.3, intercept=0.2))
    assert np.isfinite(p).all() and (np.diff(p) >= 0).all()
    assert p[0] == 0.0 and p[-1] == 1.0
    assert logsumexp(np.array([1000.0, 1000.0])) == pytest.approx(1000.0 + np.log(2.0))


def test_manifest_round_trip_and_uncalibrated_default() -> None:
    cal = Calibration(slope=0.8, intercept=-0.1, fitted_on="validation", cases=12)
    assert Calibration.from_json(json.loads(json.dumps(cal.to_json()))) == cal
    assert Calibration.from_json(None) == Calibration()  # an older export is served as the raw softmax


def test_exported_model_ships_a_fitted_calibration(model_dir: Path) -> None:
    manifest = json.loads((model_dir / "manifest.json").read_text())
    cal = Calibration.from_json(manifest["calibration"])
    assert cal.fitted_on.startswith("validation") and cal.cases > 0
    assert cal.slope > 0  # a higher model score never means a lower probability
    shown = manifest["metrics"]["test_calibration"]
    assert 0.0 < shown["mean_p_top10"] < 1.0 and 0.0 <= shown["hit_rate_top10"] <= 1.0
