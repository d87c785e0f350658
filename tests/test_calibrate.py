"""Calibrators on synthetic logits whose true calibration is known."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import OptimizeResult
from sklearn.exceptions import ConvergenceWarning
from sklearn.isotonic import IsotonicRegression

import xraycls.evaluation.calibration as calibrate
from xraycls.evaluation.calibration import (
    IsotonicCalibration,
    PlattScaling,
    TemperatureScaling,
    calibrator_from_dict,
    fit_calibrator,
    load_calibration,
    save_calibration,
)
from xraycls.evaluation.metrics import ece, nll


def _calibrated_multiclass(n: int, c: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a perfectly calibrated model: labels are drawn from softmax(logits)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.5, (n, c))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = (rng.random(n)[:, None] > p.cumsum(1)).sum(1)
    return logits, labels


def _miscalibrated_binary(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two-class logits whose margin is 3 z + 1 for a true log-odds z: over-confident and shifted."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2, n)
    labels = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(np.int64)
    return np.column_stack([np.zeros(n), 3 * z + 1]), labels


@pytest.mark.parametrize("k", [2.5, 0.5])
def test_temperature_recovers_a_known_temperature(k: float) -> None:
    logits, y = _calibrated_multiclass(20000, 3, seed=0)
    cal = fit_calibrator("temperature", logits * k, y)
    assert isinstance(cal, TemperatureScaling) and cal.kind == "softmax"
    assert cal.converged and not cal.identity_fallback
    assert cal.temperature == pytest.approx(k, rel=0.04)
    assert cal.nll_after < cal.nll_before
    raw = np.exp(logits * k) / np.exp(logits * k).sum(1, keepdims=True)
    probs = cal.predict_proba(logits * k)
    assert np.allclose(probs.sum(1), 1)
    assert ece(probs, y)[0] < ece(raw, y)[0]
    assert nll(probs, y) < nll(raw, y)
    assert np.array_equal(probs.argmax(1), logits.argmax(1))  # accuracy unchanged


def test_temperature_sigmoid_variant_multilabel_and_single_logit() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2, (8000, 4))
    y = (rng.random(z.shape) < 1 / (1 + np.exp(-z))).astype(np.int64)
    cal = fit_calibrator("temperature", 2 * z, y)
    assert cal.kind == "sigmoid" and cal.converged
    assert cal.temperature == pytest.approx(2, rel=0.04)
    assert cal.predict_proba(2 * z).shape == (8000, 4)
    one = fit_calibrator("temperature", 2 * z[:, 0], y[:, 0])
    assert one.temperature == pytest.approx(2, rel=0.1)
    p = one.predict_proba(2 * z[:, 0])
    assert p.shape == (8000, 2) and np.allclose(p.sum(1), 1)


def test_temperature_keeps_identity_when_the_search_makes_nll_worse(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    logits, y = _calibrated_multiclass(500, 3, seed=2)

    def bad(*args: object, **kwargs: object) -> OptimizeResult:
        return OptimizeResult(x=math.log(50.0), fun=1e9, success=True, message="stub")

    monkeypatch.setattr(calibrate, "minimize_scalar", bad)
    with pytest.warns(ConvergenceWarning, match="T = 50"):  # worse than both bracket ends
        cal = TemperatureScaling().fit(logits, y)
    assert cal.identity_fallback and cal.temperature == 1.0
    assert cal.nll_after == cal.nll_before


def test_temperature_on_separable_data_reports_non_convergence() -> None:
    y = np.array([0, 1] * 50)
    logits = np.column_stack([1 - 2.0 * y, 2.0 * y - 1])  # always right: T -> 0 is optimal
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        cal = TemperatureScaling().fit(logits, y)
    assert not cal.converged


def test_platt_and_isotonic_improve_calibration_on_held_out_data() -> None:
    fit_logits, fit_y = _miscalibrated_binary(6000, seed=3)
    test_logits, test_y = _miscalibrated_binary(6000, seed=4)
    raw = np.exp(test_logits) / np.exp(test_logits).sum(1, keepdims=True)
    before = ece(raw, test_y)[0]
    platt = fit_calibrator("platt", fit_logits, fit_y)
    # The margin is 3 z + 1, so the calibrated log-odds z = a * margin + b needs a = 1/3, b = -1/3.
    assert platt.a == pytest.approx(1 / 3, rel=0.05) and platt.b == pytest.approx(-1 / 3, abs=0.05)
    iso = fit_calibrator("isotonic", fit_logits, fit_y)
    for cal in (platt, iso):
        probs = cal.predict_proba(test_logits)
        assert probs.shape == (6000, 2) and np.allclose(probs.sum(1), 1)
        assert ece(probs, test_y)[0] < before / 3
        assert nll(probs, test_y) < nll(raw, test_y)
        assert cal.nll_after < cal.nll_before


def test_isotonic_applies_scikit_learns_fitted_map() -> None:
    logits, y = _miscalibrated_binary(2000, seed=5)
    p = 1 / (1 + np.exp(-(logits[:, 1] - logits[:, 0])))
    iso = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1).fit(p, y)
    new = np.column_stack([np.zeros(7), np.array([-30, -3, -1, 0, 1, 3, 30])])
    p_new = 1 / (1 + np.exp(-new[:, 1]))
    cal = IsotonicCalibration().fit(logits, y)
    assert np.allclose(cal.predict_proba(new)[:, 1], iso.predict(p_new), atol=1e-12)


def test_every_calibrator_round_trips_through_json_exactly(tmp_path: Path) -> None:
    logits3, y3 = _calibrated_multiclass(800, 3, seed=6)
    logits2, y2 = _miscalibrated_binary(800, seed=7)
    fitted = [
        fit_calibrator("temperature", 1.7 * logits3, y3),
        fit_calibrator("platt", logits2, y2),
        fit_calibrator("isotonic", logits2, y2),
    ]
    for cal in fitted:
        x = logits3 if cal.method == "temperature" else logits2
        d = cal.to_dict()
        back = calibrator_from_dict(json.loads(json.dumps(d, allow_nan=False)))
        assert type(back) is type(cal) and back.to_dict() == d
        assert np.array_equal(back.predict_proba(x), cal.predict_proba(x))

        path = save_calibration(
            tmp_path / "calibration.json", cal, classes=["a", "b"], fitted_on="oof"
        )
        loaded, extra = load_calibration(path)
        assert extra == {"classes": ["a", "b"], "fitted_on": "oof"}
        assert np.array_equal(loaded.predict_proba(x), cal.predict_proba(x))
    assert [p.name for p in tmp_path.iterdir()] == ["calibration.json"]  # no temp files left


def test_a_failed_save_leaves_the_previous_file(tmp_path: Path) -> None:
    logits, y = _miscalibrated_binary(300, seed=8)
    cal = fit_calibrator("platt", logits, y)
    path = save_calibration(tmp_path / "calibration.json", cal)
    before = path.read_text()
    with pytest.raises(ValueError):
        save_calibration(path, cal, auroc=float("nan"))  # strict JSON refuses NaN
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["calibration.json"]


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_binary_only_methods_refuse_three_classes(method: str) -> None:
    logits, y = _calibrated_multiclass(100, 3, seed=9)
    with pytest.raises(ValueError, match=r"binary-only.*3 classes"):
        fit_calibrator(method, logits, y)  # type: ignore[arg-type]
    cls = PlattScaling if method == "platt" else IsotonicCalibration
    with pytest.raises(ValueError, match="binary-only"):
        cls().fit(logits, y)


def test_bad_inputs_fail_clearly() -> None:
    with pytest.raises(ValueError, match="unknown calibration method"):
        fit_calibrator("beta", np.zeros((4, 2)), np.array([0, 1, 0, 1]))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown calibration method"):
        calibrator_from_dict({"method": "beta", "format": 1})
    with pytest.raises(RuntimeError, match="not fitted"):
        TemperatureScaling().predict_proba(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="range"):
        TemperatureScaling().fit(np.zeros((3, 2)), np.array([0, 1, 2]))
