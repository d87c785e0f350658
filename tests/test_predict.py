"""Predictor.from_run: a bundle's weights, preprocessing, calibration and threshold, end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from xraycls.bundle import BundleError
from xraycls.errors import NotDicomError
from xraycls.inference.predictor import Predictor
from xraycls.io.preprocess import preprocess_file
from xraycls.training.config import load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from xraycls.training.crossval import run_training

    labels = shared_data / "cxr-pneumonia-224" / "sample-1000.csv"
    cfg = load_config(
        REPO / "configs" / "smoke.yaml", [f"data.labels={labels}", "model.name=resnet50_test"]
    )
    out = tmp_path_factory.mktemp("run")
    run_training(cfg, out, log=lambda m: None)
    return out


def test_fold_ensemble_reproduces_out_of_fold_logits(run: Path) -> None:
    p = Predictor.from_run(run, members="folds")
    assert len(p.models) == 2 and p.classes == ["NORMAL", "PNEUMONIA"]
    with (run / "oof_predictions.csv").open() as f:
        oof = [r for r in csv.DictReader(f) if r["fold"] == "0"][:4]
    pixels = [preprocess_file(r["path"], p.prep).pixels for r in oof]
    member0 = p.logits(p.to_tensor(pixels))[0]
    stored = np.array([[float(r["logit_NORMAL"]), float(r["logit_PNEUMONIA"])] for r in oof])
    assert np.allclose(member0, stored, atol=1e-4)


def test_predict_files_calibrated_with_threshold_and_per_file_errors(
    run: Path, shared_data: Path, tmp_path: Path
) -> None:
    p = Predictor.from_run(run)
    assert p.calibrator is not None and p.calibrator.method == "temperature"
    assert p.threshold is not None
    bad = tmp_path / "page.dcm"
    bad.write_text("<!DOCTYPE html><html></html>")
    good = sorted((shared_data / "cxr-pneumonia-224" / "NORMAL").glob("*.jpeg"))[:2]
    dicom = shared_data / "dicom" / "chest_cr" / "siim_fake_MONOCHROME1.dcm"
    results = p.predict_files([good[0], bad, dicom, good[1]])
    assert isinstance(results[1], NotDicomError)
    for r in (results[0], results[2], results[3]):
        assert not isinstance(r, Exception)
        assert abs(r.probs.sum() - 1) < 1e-6 and r.member_probs.shape == (2, 2)
        expected = "PNEUMONIA" if r.probs[1] >= p.threshold else "NORMAL"
        assert r.predicted == expected


def test_incomplete_bundle_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not a complete run bundle"):
        Predictor.from_run(tmp_path)


def test_evaluate_writes_metrics_with_cis_and_plots(
    run: Path, shared_data: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from xraycls.cli import app

    root = shared_data / "cxr-pneumonia-224"
    with (root / "labels.csv").open() as f:
        rows = list(csv.DictReader(f))
    picked = [r for r in rows if r["label"] == "NORMAL"][:30] + [
        r for r in rows if r["label"] == "PNEUMONIA"
    ][:30]
    bad = tmp_path / "page.dcm"
    bad.write_text("<html></html>")
    labels = tmp_path / "test.csv"
    with labels.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "patient_id", "subtype"])
        for r in picked:
            w.writerow([str(root / r["path"]), r["label"], r["patient_id"], r["subtype"]])
        w.writerow([str(bad), "NORMAL", "X", "normal"])
    res = CliRunner().invoke(
        app,
        [
            "evaluate",
            str(run),
            "--data",
            str(labels),
            "--out",
            str(tmp_path / "e"),
            "--n-boot",
            "50",
            "--by",
            "subtype",
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert report["n_images"] == 60 and report["n_errors"] == 1
    auc = report["calibrated"]["auroc"]
    assert auc["low"] <= auc["value"] <= auc["high"]
    assert "ece" in report["uncalibrated"] and report["served"]["configuration"] == "folds"
    # Decisions at the stored threshold (the served configuration's) beside argmax, with CIs.
    at = report["at_threshold"]
    assert at["threshold"] == Predictor.from_run(run, device="cpu").threshold
    assert at["sensitivity"]["low"] <= at["sensitivity"]["value"] <= at["sensitivity"]["high"]
    assert sum(at["counts"].values()) == 60 and "sensitivity" in report["argmax"]
    # Calibration per class: intercept and slope, reliability bins with intervals.
    assert {"intercept", "slope"} <= set(report["calibration"])
    rel = report["per_class"]["PNEUMONIA"]["reliability"]
    assert sum(b["n"] for b in rel) == 60 and all(b["observed_low"] <= b["observed"] for b in rel)
    # Decision curve against treat-all / treat-none.
    dc = report["decision_curve"]
    assert len(dc["threshold"]) == len(dc["model"]) == len(dc["treat_all"]) == 99
    assert dc["treat_all"][0] == pytest.approx(0.5 - 0.5 * 0.01 / 0.99)
    # Subgroups by subtype, with intervals where there are enough images.
    groups = report["subgroups"]["subtype"]
    assert set(groups) == {"normal", "bacteria", "virus"}
    assert sum(g["n_images"] for g in groups.values()) == 60
    assert all("flags" in g or "note" in g for g in groups.values())
    for png in ("roc.png", "pr.png", "reliability.png", "confusion.png", "decision_curve.png"):
        assert (tmp_path / "e" / png).stat().st_size > 1000
    with (tmp_path / "e" / "predictions.csv").open() as f:
        preds = list(csv.DictReader(f))
    assert (
        len(preds) == 61
        and preds[-1]["status"] == "error"
        and preds[-1]["error"].startswith("not_dicom")
    )
    assert {"ood", "ood_reasons", "label", "subtype", "prob_PNEUMONIA"} <= set(preds[0])


def test_predict_flags_adult_films_scored_by_a_pediatric_bundle(
    run: Path, shared_data: Path, tmp_path: Path
) -> None:
    """Adult chest CR/DX films scored by a bundle trained on the Kermany children are not
    ordinary rows: the ood column flags them and says why; the summary counts them."""
    from typer.testing import CliRunner

    from xraycls.cli import app

    out = tmp_path / "r.csv"
    res = CliRunner().invoke(
        app,
        ["predict", str(shared_data / "dicom" / "chest_cr"), "--run", str(run), "--out", str(out),
         "--workers", "0"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)
    assert all(r["ood"] == "flagged" for r in rows)
    rg1 = next(r for r in rows if r["path"].endswith("RG1_UNCI.dcm"))
    assert (
        "Patient age 64 years is outside the training population's 1-5 years" in rg1["ood_reasons"]
    )
    assert "6 flagged out-of-distribution" in " ".join(res.output.split())
