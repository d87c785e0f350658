"""What the bundle serves is calibrated on data none of its models saw, the method is chosen by
cross-fitted NLL, and every number it states is measured on data its calibrator never saw.

Unit tests on synthetic logits (intercept shifts like class weighting makes, ensembles whose
averaged logits shrink), the per-class calibration metrics, site calibration and the refusal of
format-1 calibrations. The held-out tests on the shared pool are in
``tests/test_heldout_calibration.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy.special import expit, logit
from typer.testing import CliRunner

from xraycls.bundle import Bundle, BundleError
from xraycls.bundle.calibration import fit_configuration
from xraycls.bundle.format import ServedPredictions
from xraycls.evaluation.calibration import VectorScaling, calibrator_from_dict, fit_calibrator
from xraycls.evaluation.metrics import (
    calibration_intercept_slope,
    decision_curve,
    event_ece,
    reliability_table,
    wilson_interval,
)
from xraycls.inference.predictor import Predictor


def _binary_case(n: int, *, shift: float, seed: int) -> ServedPredictions:
    """Logits whose true log-odds are ``z``, reported as ``z + shift``: what training with
    class weights does to the intercept."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2, n)
    y = (rng.uniform(size=n) < expit(z)).astype(np.int64)
    margin = z + shift
    logits = np.column_stack([np.zeros(n), margin])
    return ServedPredictions(
        paths=[f"x{i}" for i in range(n)],
        groups=np.array([f"p{i // 2}" for i in range(n)]),  # two images per patient
        labels=y,
        classes=["NORMAL", "PNEUMONIA"],
        logits={"folds": logits},
    )


# --------------------------------------------------------------------------- metrics


def test_calibration_intercept_and_slope_recover_known_distortions() -> None:
    rng = np.random.default_rng(0)
    p = rng.uniform(0.02, 0.98, 40_000)
    y = rng.uniform(size=p.size) < p
    right = calibration_intercept_slope(p, y)
    assert abs(right["intercept"]) < 0.05 and abs(right["slope"] - 1) < 0.05
    low = calibration_intercept_slope(expit(logit(p) - 1.0), y)  # under-predicts by 1 logit
    assert low["intercept"] == pytest.approx(1.0, abs=0.05)
    extreme = calibration_intercept_slope(expit(2 * logit(p)), y)  # too confident
    assert extreme["slope"] == pytest.approx(0.5, abs=0.03)


def test_reliability_table_and_wilson_interval() -> None:
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    p = np.array([0.05, 0.05, 0.15, 0.95, 0.95, 0.95, 0.95])
    y = np.array([0, 0, 1, 1, 1, 1, 0])
    rows = reliability_table(p, y, n_bins=10)
    assert [r["n"] for r in rows] == [2, 1, 4]
    assert rows[2]["observed"] == 0.75 and rows[2]["predicted"] == pytest.approx(0.95)
    assert rows[2]["observed_low"] < 0.75 < rows[2]["observed_high"]
    expected = (2 * 0.05 + 1 * 0.85 + 4 * 0.2) / 7
    assert event_ece(p, y, n_bins=10) == pytest.approx(expected)


def test_decision_curve_matches_the_definition() -> None:
    p = np.array([0.9, 0.8, 0.3, 0.2, 0.6])
    y = np.array([1, 0, 1, 0, 0])
    dc = decision_curve(p, y, thresholds=np.array([0.5]))
    # at t = 0.5: positives 0.9 (TP), 0.8 (FP), 0.6 (FP): NB = 1/5 - 2/5 * 1
    assert dc["model"][0] == pytest.approx(1 / 5 - 2 / 5)
    assert dc["treat_all"][0] == pytest.approx(2 / 5 - 3 / 5)


# --------------------------------------------------------------------------- calibrators


def test_vector_scaling_undoes_a_per_class_intercept_shift() -> None:
    rng = np.random.default_rng(1)
    n = 6000
    y = rng.integers(0, 3, n)
    z = rng.normal(0, 1, (n, 3))
    z[np.arange(n), y] += 2.0
    shifted = z + np.array([1.5, 0.0, -0.5])  # what class weights do to a 3-class model
    vs = fit_calibrator("vector", shifted, y)
    ts = fit_calibrator("temperature", shifted, y)
    assert vs.nll_after < ts.nll_after - 0.05  # the intercepts matter; a temperature cannot help
    for c in range(3):
        assert event_ece(vs.predict_proba(shifted)[:, c], (y == c).astype(float)) < 0.03
    back = calibrator_from_dict(json.loads(json.dumps(vs.to_dict())))
    assert isinstance(back, VectorScaling)
    np.testing.assert_allclose(back.predict_proba(shifted), vs.predict_proba(shifted))
    with pytest.raises(ValueError, match="three or more classes"):
        fit_calibrator("vector", shifted[:, :2], (y > 0).astype(int))


def test_auto_chooses_an_intercept_when_the_logits_are_shifted() -> None:
    shifted = fit_configuration(_binary_case(1600, shift=-1.5, seed=2), "folds", n_boot=100)
    scores = shifted["selection"]["candidates"]
    assert shifted["method"] == "platt" and scores["platt"] < scores["temperature"]
    # Per class, the cross-fitted calibration is right on average and in spread.
    pos = shifted["validation"]["per_class"]["PNEUMONIA"]
    assert abs(pos["intercept"]) < 0.2 and abs(pos["slope"] - 1) < 0.2
    assert pos["ece"]["value"] < 0.05
    # A well-calibrated model does not need the intercept (or barely).
    fine = fit_configuration(_binary_case(1600, shift=0.0, seed=3), "folds", n_boot=100)
    cands = fine["selection"]["candidates"]
    assert abs(cands["platt"] - cands["temperature"]) < 0.01


def test_cross_fitted_operating_point_reports_what_new_patients_get() -> None:
    entry = fit_configuration(_binary_case(2000, shift=0.0, seed=4), "folds", n_boot=200)
    at = entry["validation"]["at_threshold"]
    # The stated sensitivity is measured on parts the threshold was not chosen on: near, but
    # not exactly, the 95% target (the in-sample value would be >= 0.95 by construction).
    assert 0.90 <= at["sensitivity"]["value"] <= 0.99
    assert at["sensitivity"]["low"] < at["sensitivity"]["value"] < at["sensitivity"]["high"]
    # On fresh patients from the same source, the shipped threshold keeps the stated rate
    # inside its interval.
    fresh = _binary_case(20_000, shift=0.0, seed=5)
    cal = calibrator_from_dict(entry["calibrator"])
    p = cal.predict_proba(fresh.logits["folds"])[:, 1]
    observed = np.mean(p[fresh.labels == 1] >= entry["threshold"]["threshold"])
    assert at["sensitivity"]["low"] <= observed <= at["sensitivity"]["high"]


# --------------------------------------------------------------------------- bundles


@pytest.fixture
def run(tiny_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    return copy


def test_every_served_configuration_has_its_own_calibration(run: Path) -> None:
    cal = json.loads((run / "calibration.json").read_text())
    assert cal["format"] == 2 and cal["default"] == "folds"
    assert set(cal["configurations"]) == {"folds", "refit"}
    for members in ("folds", "refit"):
        predictor = Predictor.from_run(run, members=members, device="cpu")
        entry = cal["configurations"][members]
        assert predictor.configuration == members and predictor.calibrated
        assert predictor.threshold == entry["threshold"]["threshold"]
        assert predictor.calibrator.to_dict() == calibrator_from_dict(entry["calibrator"]).to_dict()
    # predict, evaluate and the viewer all default to the same configuration.
    assert Predictor.from_run(run, device="cpu").configuration == Bundle.read(run).default_members()


def test_a_bundle_without_holdout_serves_uncalibrated_probabilities(run: Path) -> None:
    (run / "calibration.json").unlink()
    predictor = Predictor.from_run(run, device="cpu")
    assert not predictor.calibrated and predictor.threshold is None
    pred = predictor.predict([np.zeros((64, 64), np.float32)])[0]
    assert not pred.calibrated and np.allclose(pred.probs, pred.raw_probs)


def test_format_1_calibration_is_refused_with_a_fix(run: Path) -> None:
    (run / "calibration.json").write_text(
        json.dumps({"calibrator": {"method": "temperature"}, "classes": ["plain", "square"]})
    )
    with pytest.raises(BundleError, match=r"does not describe the served model.*--on"):
        Predictor.from_run(run, device="cpu")


def test_site_calibration_is_stored_beside_and_chosen_by_name(run: Path, tmp_path: Path) -> None:
    from conftest import write_square_dataset

    from xraycls.cli import app

    site = write_square_dataset(tmp_path / "site", n=40, seed=11)
    before = (run / "calibration.json").read_bytes()
    res = CliRunner().invoke(
        app, ["calibrate", str(run), "--on", str(site), "--name", "hospital-b", "--n-boot", "100"]
    )
    assert res.exit_code == 0, res.output
    assert (run / "calibration.json").read_bytes() == before  # the original is untouched
    stored = json.loads((run / "calibrations" / "hospital-b.json").read_text())
    entry = stored["configurations"]["folds"]
    assert entry["data"]["n_images"] == 40 and entry["data"]["source"] == "hospital-b labelled set"
    site_pred = Predictor.from_run(run, calibration="hospital-b", device="cpu")
    assert site_pred.threshold == entry["threshold"]["threshold"]
    assert site_pred.calibration_name == "hospital-b"
    assert "## Site calibrations" in (run / "MODEL_CARD.md").read_text()
    with pytest.raises(BundleError, match=r"no site calibration 'nope'.*hospital-b"):
        Predictor.from_run(run, calibration="nope", device="cpu")
    again = CliRunner().invoke(
        app, ["calibrate", str(run), "--on", str(site), "--name", "hospital-b"]
    )
    assert again.exit_code == 2 and "exists" in again.output
    bad = CliRunner().invoke(app, ["calibrate", str(run), "--on", str(site), "--name", "../x"])
    assert bad.exit_code == 2 and "use letters, digits" in bad.output
