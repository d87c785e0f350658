"""Multi-label findings end to end: config, labels, splits, loss, metrics, bundle, predict, CAM.

Runs everywhere on a synthetic set drawn in the test: each finding is a shape (a bright square,
a bright disc, a dark bar) that an image carries or not, independently; some labels are left
blank (unknown) or -1 (uncertain). One test reads the shared NIH ChestX-ray14 sample and skips
without it.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FINDINGS, REPO, multilabel_overrides, shared_data_dir, write_findings_dataset

from xraycls.errors import ConfigError
from xraycls.evaluation.metrics import auroc, multilabel_metrics, sigmoid
from xraycls.evaluation.splits import holdout_split, multilabel_parts, patient_folds
from xraycls.io.preprocess import Preprocessing
from xraycls.training.config import load_config
from xraycls.training.data import load_table
from xraycls.training.engine import masked_bce, pos_weights


def ml_config(labels: Path, *extra: str):
    return load_config(REPO / "configs" / "smoke.yaml", [*multilabel_overrides(labels), *extra])


@pytest.fixture(scope="module")
def ml_run(tiny_multilabel_run: Path) -> Path:
    return tiny_multilabel_run


@pytest.fixture(scope="module")
def labels_csv(tiny_multilabel_run: Path) -> Path:
    return Path(load_config(tiny_multilabel_run / "config.yaml").data.labels)


# --------------------------------------------------------------------------- config and labels


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.task=multilabel"], "needs data.label_columns"),
        (["data.label_columns=[A, B]"], "need data.task: multilabel"),
        (
            ["data.task=multilabel", "data.label_columns=[A]", "data.label_separator='|'"],
            "exclude each other",
        ),
        (["data.task=multilabel", "data.label_columns=[A, A]"], "duplicated"),
        (
            ["data.task=multilabel", "data.label_columns=[A, B]", "train.pos_weight={C: 2}"],
            "not findings",
        ),
        (["train.pos_weight=auto"], "needs data.task: multilabel"),
        (["data.task=multilabel", "data.label_separator='|'", "data.classes=[a, b]"], "findings"),
    ],
)
def test_config_errors_before_any_data(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_labels_from_columns_mask_unknown_and_uncertain(labels_csv: Path) -> None:
    prep = Preprocessing(image_size=64)
    table = load_table(ml_config(labels_csv).data, prep)
    assert table.multilabel and table.classes == FINDINGS
    rows = list(csv.DictReader(labels_csv.open()))
    for i, r in enumerate(rows):
        for j, f in enumerate(FINDINGS):
            if r[f] in ("", "-1"):
                assert math.isnan(table.labels[i, j])
            else:
                assert table.labels[i, j] == float(r[f])
    zero = load_table(ml_config(labels_csv, "data.uncertain=zero").data, prep)
    assert not np.isnan(zero.labels).any()
    assert np.array_equal(zero.labels, np.nan_to_num(table.labels, nan=0.0))


def test_labels_from_separated_column_agree_and_drop_no_finding(labels_csv: Path) -> None:
    prep = Preprocessing(image_size=64)
    cfg = ml_config(labels_csv, "data.label_columns=null", "data.label_separator='|'")
    cfg.data.label_column = "finding_labels"
    table = load_table(cfg.data, prep)
    assert sorted(table.classes) == sorted(FINDINGS) and "No Finding" not in table.classes
    cfg.data.findings = FINDINGS
    fixed = load_table(cfg.data, prep)
    assert fixed.classes == FINDINGS
    columns = load_table(ml_config(labels_csv, "data.uncertain=zero").data, prep)
    # The separated column knows no "unknown": where the columns say 1/0 they agree.
    known = ~np.isnan(load_table(ml_config(labels_csv).data, prep).labels)
    assert np.array_equal(fixed.labels[known], columns.labels[known])


def test_bad_label_value_names_file_line_and_column(tmp_path: Path) -> None:
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("path,patient_id,A,B\na.png,p1,1,0\nb.png,p2,yes-ish,1\n")
    cfg = load_config(
        None, [f"data.labels={csv_path}", "data.task=multilabel", "data.label_columns=[A, B]"]
    )
    with pytest.raises(ConfigError, match=r"line 3: column 'A' holds 'yes-ish'"):
        load_table(cfg.data, Preprocessing(image_size=64))
    cfg.data.label_columns = ["A", "C"]
    with pytest.raises(ConfigError, match=r"no column\(s\) \['C'\]"):
        load_table(cfg.data, Preprocessing(image_size=64))


# --------------------------------------------------------------------------- splits


def test_multilabel_folds_keep_patients_whole_and_spread_every_finding() -> None:
    rng = np.random.default_rng(3)
    n_pat, k, folds = 150, 6, 3
    rates = np.array([0.05, 0.1, 0.2, 0.3, 0.45, 0.08])
    per_patient = rng.integers(1, 4, n_pat)
    groups = np.repeat(np.arange(n_pat), per_patient)
    y = (rng.random((len(groups), k)) < rates).astype(np.float64)
    y[rng.random(y.shape) < 0.05] = np.nan
    fold = patient_folds(y, groups, folds=folds, seed=1)
    for g in np.unique(groups):
        assert len(np.unique(fold[groups == g])) == 1
    pos = np.array([np.nansum(y[fold == q], axis=0) for q in range(folds)])
    total = np.nansum(y, axis=0)
    # Every finding within a few images of an even share in every fold.
    assert np.all(np.abs(pos - total / folds) <= np.maximum(3, 0.2 * total / folds)), pos
    sizes = np.bincount(fold)
    assert sizes.max() - sizes.min() <= 0.15 * len(groups)


def test_multilabel_parts_are_deterministic_and_seeded() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random((60, 3)) < 0.3).astype(float)
    groups = np.arange(60)
    a = multilabel_parts(y, groups, n_parts=3, seed=5)
    assert np.array_equal(a, multilabel_parts(y, groups, n_parts=3, seed=5))
    assert not np.array_equal(a, multilabel_parts(y, groups, n_parts=3, seed=6))


def test_holdout_names_the_short_finding_index() -> None:
    y = np.zeros((40, 2))
    y[:20, 0] = 1
    y[0, 1] = 1  # one positive image of finding 1: no holdout part can hold two
    with pytest.raises(ValueError, match="finding #1"):
        holdout_split(y, np.arange(40), fraction=0.25, seed=0)


def test_too_few_positives_in_a_fold_is_an_error_naming_finding_and_fold(
    tmp_path: Path,
) -> None:
    from xraycls.training.crossval import run_training

    labels = write_findings_dataset(tmp_path / "d", n=48)
    rows = list(csv.DictReader(labels.open()))
    for i, r in enumerate(rows):  # Bar: 3 positives in all, over 3 folds
        r["Bar"] = "1" if i in (0, 10, 20) else "0"
    with labels.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cfg = ml_config(labels, "cv.folds=3", "cv.calibration_holdout=0", "calibration.method=none")
    with pytest.raises(ConfigError, match=r"finding 'Bar' has \d positive .* in fold \d"):
        run_training(cfg, tmp_path / "run", log=lambda m: None)


# --------------------------------------------------------------------------- loss and metrics


def test_masked_bce_ignores_unknown_labels_entirely() -> None:
    logits = torch.randn(6, 3, requires_grad=True)
    y = torch.tensor([[1, 0, float("nan")]] * 6)
    loss = masked_bce(logits, y)
    loss.backward()
    assert torch.all(logits.grad[:, 2] == 0)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, :2], y[:, :2])
    assert torch.isclose(loss, expected)
    pw = torch.tensor([3.0, 1.0, 1.0])
    weighted = masked_bce(logits, y, pw)
    ref = torch.nn.BCEWithLogitsLoss(pos_weight=pw[:2])(logits[:, :2], y[:, :2])
    assert torch.isclose(weighted, ref)


def test_pos_weights_auto_mapping_and_none() -> None:
    y = np.array([[1, 0], [0, 0], [0, np.nan], [0, 1]], dtype=float)
    assert torch.allclose(pos_weights(y, ["a", "b"], "auto"), torch.tensor([3.0, 2.0]))
    assert torch.allclose(pos_weights(y, ["a", "b"], {"b": 4.0}), torch.tensor([1.0, 4.0]))
    assert pos_weights(y, ["a", "b"], "none") is None


def test_multilabel_metrics_mask_unknown_and_match_per_finding_auroc() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random((200, 3)) < 0.3).astype(float)
    z = rng.normal(size=(200, 3)) + 2 * y
    y_masked = y.copy()
    y_masked[:30, 1] = np.nan
    m = multilabel_metrics(sigmoid(z), y_masked, ["a", "b", "c"])
    assert m["per_finding"]["b"]["n"] == 170
    assert m["per_finding"]["b"]["auroc"] == pytest.approx(auroc(z[30:, 1], y[30:, 1]))
    assert m["auroc"] == pytest.approx(np.mean([m["per_finding"][f]["auroc"] for f in "abc"]))
    known = ~np.isnan(y_masked)
    assert m["auroc_micro"] == pytest.approx(auroc(z[known], y[known]))


# --------------------------------------------------------------------------- the bundle


def test_bundle_reports_every_finding_with_floor_and_calibration(ml_run: Path) -> None:
    from xraycls.bundle import Bundle

    bundle = Bundle.read(ml_run)
    assert bundle.multilabel and list(bundle.classes) == FINDINGS
    metrics = json.loads((ml_run / "metrics.json").read_text())
    assert metrics["task"] == "multilabel"
    for f in FINDINGS:
        pf = metrics["pooled_oof"]["per_finding"][f]
        assert 0 <= pf["auroc"] <= 1 and 0 <= pf["auprc"] <= 1 and len(pf["auroc_ci"]) == 2
        assert 0 <= metrics["floor_logreg_32px"]["per_finding"][f]["auroc"] <= 1
    oof = bundle.oof()
    assert oof.labels.shape == (metrics["n_images"], 3)
    assert np.isnan(oof.labels).any()  # the unknown labels stay unknown in the bundle
    cal = json.loads((ml_run / "calibration.json").read_text())
    entry = cal["configurations"]["folds"]
    assert entry["task"] == "multilabel" and list(entry["findings"]) == FINDINGS
    for f in FINDINGS:
        e = entry["findings"][f]
        assert e["method"] in ("temperature", "platt")
        assert 0 < e["threshold"]["threshold"] < 1 and e["threshold"]["positive"] == f
        assert "sensitivity" in e["validation"]["at_threshold"]
    card = (ml_run / "MODEL_CARD.md").read_text()
    assert "Multi-label: 3 findings" in card
    for f in FINDINGS:
        assert f"| {f} |" in card


def test_predict_writes_probability_and_decision_per_finding(
    ml_run: Path, labels_csv: Path, tmp_path: Path
) -> None:
    from xraycls.inference.predictor import Predictor
    from xraycls.inference.scoring import score

    out = tmp_path / "pred.csv"
    score(labels_csv.parent, out, run=ml_run, workers=0, batch_size=8, device="cpu")
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 72 and all(r["status"] == "ok" for r in rows)
    cal = json.loads((ml_run / "calibration.json").read_text())["configurations"]["folds"]
    thresholds = {f: cal["findings"][f]["threshold"]["threshold"] for f in FINDINGS}
    for r in rows:
        for f in FINDINGS:
            assert r[f"dec_{f}"] == ("1" if float(r[f"prob_{f}"]) >= thresholds[f] else "0")
        present = [f for f in FINDINGS if r[f"dec_{f}"] == "1"]
        assert r["predicted"] == ("|".join(present) or "No Finding")
    # The same numbers as the predictor's, and probabilities are not a softmax.
    p = Predictor.from_run(ml_run, device="cpu")
    assert p.multilabel and p.calibrator is not None
    first = p.predict_files([labels_csv.parent / rows[0]["path"].split("/")[-1]])[0]
    assert np.allclose(first.probs, [float(rows[0][f"prob_{f}"]) for f in FINDINGS], atol=1e-6)
    total = sum(float(r[f"prob_{f}"]) for r in rows for f in FINDINGS)
    assert abs(total / len(rows) - 1) > 1e-3


def test_cam_explains_the_selected_finding(ml_run: Path, labels_csv: Path) -> None:
    from xraycls.inference.cam import explain_pixels
    from xraycls.inference.predictor import Predictor
    from xraycls.io.preprocess import preprocess_file

    p = Predictor.from_run(ml_run, device="cpu")
    pixels = [preprocess_file(labels_csv.parent / "img001.png", p.prep).pixels]
    maps = {f: explain_pixels(p, pixels, target=f)[0] for f in FINDINGS}
    assert [maps[f].target for f in FINDINGS] == FINDINGS
    assert not np.allclose(maps["Square"].heatmap, maps["Bar"].heatmap)
    default = explain_pixels(p, pixels)[0]
    assert default.target == FINDINGS[int(np.argmax(p.predict(pixels)[0].probs))]


def test_viewer_findings_table_is_ranked_with_intervals(ml_run: Path, labels_csv: Path) -> None:
    from xraycls.bundle.summary import summarize_run
    from xraycls.inference.analysis import analyse, decision_text, findings_table
    from xraycls.inference.predictor import Predictor

    p = Predictor.from_run(ml_run, device="cpu")
    summary = summarize_run(ml_run)
    assert summary.multilabel and set(summary.served["folds"].findings) == set(FINDINGS)
    a = analyse(p, "img003.png", (labels_csv.parent / "img003.png").read_bytes())
    rows = findings_table(a.prediction, summary.classes, summary.served["folds"])
    probs = [r.probability for r in rows]
    assert probs == sorted(probs, reverse=True) and {r.name for r in rows} == set(FINDINGS)
    for r in rows:
        assert r.present == (r.probability >= r.threshold)
        assert r.auroc is not None and r.auroc["low"] <= r.auroc["value"] <= r.auroc["high"]
    text = decision_text(a.prediction, summary.classes, None)
    present = [r.name for r in rows if r.present]
    assert all(f in text for f in present) if present else text.startswith("no finding")


def test_viewer_app_shows_ranked_findings_and_a_cam_per_finding(
    ml_run: Path, labels_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "ml").symlink_to(ml_run)
    monkeypatch.setenv("XRAYCLS_RUNS", str(runs))
    monkeypatch.setenv("XRAYCLS_DEVICE", "cpu")
    monkeypatch.setattr("sys.argv", ["streamlit_app.py"])
    st.cache_resource.clear()
    st.cache_data.clear()
    at = AppTest.from_file(str(REPO / "app" / "streamlit_app.py"), default_timeout=120).run()
    assert not at.exception, at.exception
    png = (labels_csv.parent / "img003.png").read_bytes()
    at.file_uploader(key="uploads").set_value(("img003.png", png, "image/png")).run()
    assert not at.exception, at.exception
    assert any(m.value == "#### Findings, most probable first" for m in at.markdown)
    table = at.table[0].value
    assert sorted(table["Finding"]) == sorted(FINDINGS)
    probs = [float(v) for v in table["P(finding), calibrated"]]
    assert probs == sorted(probs, reverse=True)
    assert all(" [" in v for v in table["AUROC (holdout)"])  # with its interval
    captions = [c for img in at.image for c in img.captions]
    assert captions[1] == f"Grad-CAM overlay — gradcam, target {table['Finding'].iloc[0]}"
    for f in ("Bar", "Disc"):
        at.selectbox(key="cam_target").set_value(f).run()
        assert not at.exception
        captions = [c for img in at.image for c in img.captions]
        assert captions[1] == f"Grad-CAM overlay — gradcam, target {f}"


# --------------------------------------------------------------------------- slow / shared data


@pytest.mark.slow
def test_findings_are_learnt_on_the_synthetic_set(tmp_path: Path) -> None:
    """The shapes are learnable: a few epochs beat chance on every finding, out of fold."""
    from xraycls.training.crossval import run_training

    labels = write_findings_dataset(tmp_path / "d", n=160, seed=2)
    cfg = ml_config(labels, "train.stages=[{epochs: 8, train: all, lr: 3.0e-3}]")
    run_training(cfg, tmp_path / "run", log=lambda m: None)
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())["pooled_oof"]
    assert all(m["per_finding"][f]["auroc"] > 0.75 for f in FINDINGS), m["per_finding"]


def test_shared_nih_labels_load_as_fourteen_findings() -> None:
    labels = shared_data_dir() / "nih-cxr14" / "labels.csv"
    if not labels.exists():
        pytest.skip(f"shared NIH ChestX-ray14 sample not found at {labels}")
    cfg = load_config(REPO / "configs" / "nih_multilabel.yaml", [f"data.labels={labels}"])
    table = load_table(cfg.data, Preprocessing(image_size=128))
    assert len(table) == 621 and len(table.classes) == 14
    assert "No Finding" not in table.classes and "No_Finding" not in table.classes
    rows = list(csv.DictReader(labels.open()))
    for j, f in enumerate(table.classes):  # the pipe-separated column agrees with NIH's 0/1 columns
        assert table.labels[:, j].sum() == sum(int(r[f]) for r in rows)
    folds = patient_folds(table.labels, table.groups, folds=3, seed=0)
    per_fold = np.array([table.labels[folds == k].sum(0) for k in range(3)])
    assert per_fold.min() >= 5  # Edema (18) and Hernia (20) reach every fold


@pytest.mark.slow
def test_train_on_the_shared_nih_sample_end_to_end(tmp_path: Path) -> None:
    """``xraycls train`` with ``task: multilabel`` on the shared NIH sample leaves a bundle whose
    per-finding report, predictions, viewer table and CAMs work (a tiny, short recipe: what is
    tested is the path, not the accuracy; docs/multilabel_nih.md has the real numbers)."""
    labels = shared_data_dir() / "nih-cxr14" / "labels.csv"
    if not labels.exists():
        pytest.skip(f"shared NIH ChestX-ray14 sample not found at {labels}")
    from xraycls.bundle.summary import summarize_run
    from xraycls.inference.analysis import analyse, explain, findings_table
    from xraycls.inference.predictor import Predictor
    from xraycls.inference.scoring import score
    from xraycls.training.crossval import run_training

    cfg = load_config(
        REPO / "configs" / "nih_multilabel.yaml",
        [
            f"data.labels={labels}",
            "model.image_size=64",
            "cv.folds=2",
            "train.stages=[{epochs: 1, train: all, lr: 1.0e-3}]",
            "calibration.n_boot=100",
        ],
    )
    run = tmp_path / "run"
    run_training(cfg, run, log=lambda m: None)
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["pooled_oof"]["per_finding"]) == 14
    card = (run / "MODEL_CARD.md").read_text()
    assert "| Hernia |" in card and "| Edema |" in card
    images = sorted((labels.parent / "images").glob("*.png"))[:3]
    out = tmp_path / "pred.csv"
    score(images[0].parent / images[0].name, out, run=run, workers=0, device="cpu")
    row = next(csv.DictReader(out.open()))
    assert row["status"] == "ok" and "prob_Hernia" in row and row["dec_Hernia"] in ("0", "1")
    p = Predictor.from_run(run, device="cpu")
    summary = summarize_run(run)
    a = analyse(p, images[1].name, images[1].read_bytes())
    table = findings_table(a.prediction, summary.classes, summary.served["folds"])
    assert len(table) == 14 and table[0].probability >= table[-1].probability
    cam = explain(p, a, target="Effusion")
    assert cam.target == "Effusion" and cam.heatmap.shape == (64, 64)


def test_compare_reports_multilabel_runs_per_finding(ml_run: Path, tmp_path: Path) -> None:
    import shutil

    from xraycls.bundle import BundleError
    from xraycls.reports.compare import compare_runs

    other = tmp_path / "again"
    shutil.copytree(ml_run, other)
    report = compare_runs([ml_run, other], tmp_path / "cmp", n_boot=100, log=lambda m: None)
    assert report["task"] == "multilabel" and report["findings"] == FINDINGS
    names = [r["name"] for r in report["rows"]]
    assert len(names) == 3 and names[-1].startswith("floor")
    twin = report["rows"][1]["vs_baseline"]["macro_diff"]
    assert twin["value"] == 0 and twin["low"] == twin["high"] == 0  # identical predictions
    md = (tmp_path / "cmp" / "report.md").read_text()
    for f in FINDINGS:
        assert f"| {f} |" in md
    with pytest.raises(BundleError, match="same task"):
        compare_runs([ml_run, _tiny_multiclass(tmp_path)], tmp_path / "x", log=lambda m: None)


def _tiny_multiclass(tmp_path: Path) -> Path:
    """A multi-class bundle's identity files beside the multi-label one (no training needed:
    compare reads labels.json and the OOF file first)."""
    import shutil

    from xraycls.bundle.format import OutOfFold, write_oof

    src = tmp_path / "mc"
    src.mkdir()
    shutil.copy(REPO / "configs" / "smoke.yaml", src / "config.yaml")
    (src / "labels.json").write_text(json.dumps({"classes": ["a", "b"], "label_column": "label"}))
    (src / "bundle.json").write_text(
        json.dumps(
            {
                "model": "resnet50_test",
                "image_size": 64,
                "normalization": {"mean": [0.5] * 3, "std": [0.5] * 3},
                "preprocessing": {
                    "image_size": 64,
                    "resize": "letterbox",
                    "window": "auto",
                    "percentiles": [0.5, 99.5],
                },
                "fold_weights": [],
            }
        )
    )
    oof = OutOfFold(
        paths=["x.png", "y.png"],
        groups=np.array(["p1", "p2"]),
        labels=np.array([0, 1]),
        folds=np.array([0, 1]),
        logits=np.zeros((2, 2)),
        classes=["a", "b"],
    )
    write_oof(src, oof, np.full((2, 2), 0.5))
    return src


def test_dicom_results_carry_one_decision_per_finding(ml_run: Path, tmp_path: Path) -> None:
    """The SR of a multi-label bundle names every finding with its probability and its own
    decision (the finding at or above its threshold), as the results CSV does."""
    pytest.importorskip("highdicom", reason="the pacs extra (highdicom) is not installed")
    import shutil

    import pydicom
    from pydicom.data import get_testdata_file

    from xraycls.inference.scoring import score
    from xraycls.io.dicom_results import read_sr_findings

    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), src / "ct.dcm")
    out, dcm = tmp_path / "r.csv", tmp_path / "dcm"
    score(src, out, run=ml_run, workers=0, device="cpu", dicom_out=dcm)
    (row,) = list(csv.DictReader(out.open()))
    assert row["status"] == "ok", row
    found = read_sr_findings(pydicom.dcmread(row["dicom_path"]))
    assert set(found) == set(FINDINGS)
    for f in FINDINGS:
        assert found[f][0] == pytest.approx(float(row[f"prob_{f}"]), abs=1e-6)
        assert found[f][1] == (row[f"dec_{f}"] == "1")
