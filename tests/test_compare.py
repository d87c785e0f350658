"""``xraycls compare``: alignment, the numbers against direct computation, errors and the CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from scipy.special import softmax
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from xraycls.bundle import BundleError
from xraycls.bundle.calibration import calibrate_run
from xraycls.bundle.format import HOLDOUT_FILE, ServedPredictions, write_bundle_meta, write_served
from xraycls.cli import app
from xraycls.evaluation.metrics import delong_test, ece
from xraycls.io.preprocess import Preprocessing
from xraycls.reports.compare import FLOOR, compare_runs


def make_cases(n: int = 240, n_classes: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Cases of ~n/2 patients with 1-3 images each, labels and 5 patient-grouped folds."""
    rng = np.random.default_rng(seed)
    patients = np.repeat(np.arange(n), rng.integers(1, 3, n))[:n]
    labels = rng.integers(0, n_classes, n)
    labels = labels[np.searchsorted(np.unique(patients), patients)]  # one label per patient
    return {
        "paths": np.array([f"img{i:04d}.png" for i in range(n)]),
        "groups": np.array([f"p{p:04d}" for p in patients]),
        "labels": labels,
        "folds": patients % 5,
    }


def scores(cases: dict[str, np.ndarray], strength: float, scale: float, seed: int) -> np.ndarray:
    """Logits that separate the classes by ``strength``, over-confident by ``scale``."""
    rng = np.random.default_rng(seed)
    y = cases["labels"]
    c = int(y.max()) + 1
    z = rng.normal(0, 1, (len(y), c))
    z[np.arange(len(y)), y] += strength
    return z * scale


def write_run(
    root: Path,
    name: str,
    model: str,
    cases: dict[str, np.ndarray],
    logits: np.ndarray,
    floor: np.ndarray,
    classes: list[str],
    *,
    shuffle: int | None = None,
) -> Path:
    """A run bundle with just what ``compare`` reads; calibration fitted as ``train`` does."""
    run = root / name
    run.mkdir(parents=True)
    write_bundle_meta(
        run,
        model=model,
        image_size=64,
        classes=classes,
        label_column="label",
        normalization=((0.5,) * 3, (0.5,) * 3),
        prep=Preprocessing(image_size=64),
        folds=int(cases["folds"].max()) + 1,
        refit=False,
    )
    (run / "metrics.json").write_text(
        json.dumps(
            {"train_seconds_per_image": 0.01, "inference_seconds_per_image": 0.002, "device": "cpu"}
        )
    )
    order = np.arange(len(logits))
    if shuffle is not None:
        order = np.random.default_rng(shuffle).permutation(order)
    cols = ["path", "patient_id", "label", "fold"]
    cols += [f"logit_{c}" for c in classes] + [f"floor_prob_{c}" for c in classes]
    with (run / "oof_predictions.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for i in order:
            w.writerow(
                [cases["paths"][i], cases["groups"][i], classes[cases["labels"][i]]]
                + [int(cases["folds"][i])]
                + [f"{v:.8f}" for v in logits[i]]
                + [f"{v:.8f}" for v in floor[i]]
            )
    # compare reads which calibrator the run chose; a copy of the cases stands in for the
    # holdout the calibration is fitted on (compare itself uses the out-of-fold rows only).
    write_served(
        run / HOLDOUT_FILE,
        ServedPredictions(
            paths=[f"holdout/{p}" for p in cases["paths"]],
            groups=np.array([f"h{g}" for g in cases["groups"]]),
            labels=cases["labels"],
            classes=classes,
            logits={"folds": logits},
        ),
    )
    calibrate_run(run, n_boot=100)
    return run


@pytest.fixture
def binary_runs(tmp_path: Path) -> tuple[list[Path], dict[str, np.ndarray]]:
    cases = make_cases()
    classes = ["NORMAL", "PNEUMONIA"]
    floor = softmax(scores(cases, 1.0, 1.0, seed=9), axis=1)
    strong = write_run(
        tmp_path, "swin", "swin_test", cases, scores(cases, 1.5, 4.0, 1), floor, classes
    )
    weak = write_run(
        tmp_path,
        "resnet",
        "resnet50_test",
        cases,
        scores(cases, 1.2, 1.0, 2),
        floor,
        classes,
        shuffle=3,  # rows in another order: compare must align them by path
    )
    return [strong, weak], cases


def test_numbers_match_direct_computation(
    binary_runs: tuple[list[Path], dict[str, np.ndarray]], tmp_path: Path
) -> None:
    runs, cases = binary_runs
    report = compare_runs(runs, tmp_path / "report", n_boot=200, log=lambda m: None)
    assert report["baseline"] == "resnet"  # the ResNet50 run by default
    rows = {r["name"]: r for r in report["rows"]}
    assert set(rows) == {"swin", "resnet", FLOOR}

    order = np.argsort(cases["paths"])
    y = cases["labels"][order]
    swin = softmax(scores(cases, 1.5, 4.0, 1), axis=1)[order]
    resnet = softmax(scores(cases, 1.2, 1.0, 2), axis=1)[order]
    assert rows["swin"]["auroc"]["value"] == pytest.approx(roc_auc_score(y, swin[:, 1]), abs=1e-6)
    lo, hi = rows["swin"]["auroc"]["low"], rows["swin"]["auroc"]["high"]
    assert lo < rows["swin"]["auroc"]["value"] < hi
    d = delong_test(y, swin[:, 1], resnet[:, 1])
    vs = rows["swin"]["vs_baseline"]
    assert vs["delong_p"] == pytest.approx(d["p_value"], rel=1e-6)
    assert vs["diff"] == pytest.approx(d["diff"], abs=1e-6) and vs["low"] < vs["diff"] < vs["high"]
    assert "vs_baseline" not in rows["resnet"] and "vs_floor" in rows["resnet"]
    assert rows["swin"]["ece_before"] == pytest.approx(ece(swin, y)[0], abs=1e-9)
    # Over-confident logits (scale 4): the cross-fitted temperature must reduce the ECE.
    assert rows["swin"]["ece_after"] < rows["swin"]["ece_before"]
    # The cross-fitted 95%-sensitivity threshold lands near its target on held-out folds.
    assert 0.85 <= rows["swin"]["sensitivity"]["value"] <= 1.0
    assert rows["swin"]["params"] > 0 and rows[FLOOR]["params"] == 1025


def test_report_files(
    binary_runs: tuple[list[Path], dict[str, np.ndarray]], tmp_path: Path
) -> None:
    runs, _ = binary_runs
    out = tmp_path / "report"
    compare_runs(runs, out, n_boot=100, log=lambda m: None)
    md = (out / "report.md").read_text()
    tables = md.split("\n\n")
    main = next(b for b in tables if b.startswith("| model | params"))
    assert len(main.splitlines()) == 2 + 3  # header, rule, two runs and the floor
    per_class = next(b for b in tables if "ECE / intercept / slope" in b)
    assert len(per_class.splitlines()) == 2 + 3 and "PNEUMONIA: ECE" in per_class
    assert "**resnet**" in md and FLOOR in md and "p = " in md
    assert json.loads((out / "report.json").read_text())["n_images"] == 240
    for png in ("roc.png", "reliability.png"):
        assert (out / png).stat().st_size > 10_000


def test_three_classes_have_per_class_delong(tmp_path: Path) -> None:
    cases = make_cases(n_classes=3, seed=4)
    classes = ["bacteria", "normal", "virus"]
    floor = softmax(scores(cases, 0.8, 1.0, 7), axis=1)
    runs = [
        write_run(tmp_path, m, m, cases, scores(cases, s, 1.5, i), floor, classes)
        for i, (m, s) in enumerate((("resnet50_test", 1.0), ("vit_test", 1.5)))
    ]
    report = compare_runs(runs, tmp_path / "r", baseline="vit_test", n_boot=100, log=lambda m: None)
    row = next(r for r in report["rows"] if r["name"] == "resnet50_test")
    assert report["baseline"] == "vit_test"
    assert set(row["vs_baseline"]["delong_p_per_class"]) == {"0", "1", "2"}
    assert row["operating_point"] == "argmax"
    md = (tmp_path / "r" / "report.md").read_text()
    assert "## AUROC per class" in md and "bacteria / normal / virus" in md


def test_runs_on_different_data_are_refused(
    binary_runs: tuple[list[Path], dict[str, np.ndarray]], tmp_path: Path
) -> None:
    runs, _ = binary_runs
    other = make_cases(n=100, seed=5)
    floor = softmax(scores(other, 1.0, 1.0, 9), axis=1)
    odd = write_run(
        tmp_path, "odd", "vit_test", other, scores(other, 1, 1, 0), floor, ["NORMAL", "PNEUMONIA"]
    )
    with pytest.raises(BundleError, match=r"odd.*differ"):
        compare_runs([runs[0], odd], tmp_path / "x", log=lambda m: None)
    with pytest.raises(BundleError, match="baseline 'nope'"):
        compare_runs(runs, tmp_path / "x", baseline="nope", log=lambda m: None)


def test_cli(binary_runs: tuple[list[Path], dict[str, np.ndarray]], tmp_path: Path) -> None:
    runs, _ = binary_runs
    out = tmp_path / "cli"
    args = ["compare", *map(str, runs), "--out", str(out), "--n-boot", "50"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "report.md").exists()
    bad = CliRunner().invoke(app, [*args, "--baseline", "nope"])
    assert bad.exit_code == 2


def test_a_real_bundle_against_its_floor(tiny_run: Path, tmp_path: Path) -> None:
    report = compare_runs([tiny_run], tmp_path / "r", n_boot=50, log=lambda m: None)
    assert [r["name"] for r in report["rows"]] == [tiny_run.name, FLOOR]
    assert report["rows"][0]["model"] == "resnet50_test"
