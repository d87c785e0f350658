"""Held-out tests that cannot pass by construction (issue: every number belongs to the served
model and is measured on data it never saw).

A small class-weighted model is trained on part of the shared pediatric pool; 1,000 images of
other patients, which neither its models nor its calibrator nor its threshold ever saw, are
scored with the served default. On them:

- the calibrated P(PNEUMONIA) matches the observed rate in every bin, within the bin's Wilson
  interval, while the class-weighted model's raw probabilities do not (so the check can fail);
- the sensitivity at the stored threshold and the ECE fall inside the intervals the bundle
  states for them.

Needs ``../shared/data`` (or ``XRAYCLS_SHARED_DATA``); about 3 minutes on 2 cores.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from xraycls.evaluation.metrics import ece, event_ece, reliability_table
from xraycls.evaluation.splits import holdout_split
from xraycls.inference.predictor import Predictor
from xraycls.training.config import load_config
from xraycls.training.crossval import run_training

REPO = Path(__file__).resolve().parents[1]
N_TRAIN, N_UNSEEN = 1800, 1000


@pytest.fixture(scope="module")
def pool(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two patient-disjoint labels CSVs drawn from the whole pool (its prevalence kept)."""
    labels = shared_data / "cxr-pneumonia-224" / "labels.csv"
    with labels.open(newline="") as f:
        rows = list(csv.DictReader(f))
    y = np.array([r["label"] == "PNEUMONIA" for r in rows], dtype=int)
    groups = np.array([r["patient_id"] for r in rows])
    rest, unseen = holdout_split(y, groups, fraction=0.25, seed=123)
    rng = np.random.default_rng(0)
    out = tmp_path_factory.mktemp("pool")
    paths = {}
    for name, idx, n in (("train", rest, N_TRAIN), ("unseen", unseen, N_UNSEEN)):
        keep = _whole_patients(idx, groups, n, rng)
        csv_path = out / f"{name}.csv"
        with csv_path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["path", "label", "patient_id"])
            w.writeheader()
            for i in keep:
                absolute = (labels.parent / rows[i]["path"]).resolve()
                w.writerow({"path": absolute, "label": rows[i]["label"], "patient_id": groups[i]})
        paths[name] = csv_path
    return paths


def _whole_patients(idx: np.ndarray, groups: np.ndarray, n: int, rng: np.random.Generator) -> list:
    order = rng.permutation(np.unique(groups[idx]))
    chosen: list[int] = []
    by_patient = {g: [i for i in idx if groups[i] == g] for g in order}
    for g in order:
        if len(chosen) >= n:
            break
        chosen += by_patient[g]
    return chosen


@pytest.fixture(scope="module")
def bundle(pool: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = load_config(
        REPO / "configs" / "smoke.yaml",
        [
            f"data.labels={pool['train']}",
            "data.limit=null",
            "model.name=resnet50_test",
            "model.image_size=64",
            "train.class_weighting=true",  # shifts the logits' intercept: what calibration undoes
            "train.stages=[{epochs: 3, train: all, lr: 0.003}]",
            "train.batch_size=64",
            "augment.enabled=false",
            "cv.folds=2",
            "cv.calibration_holdout=0.3",
            "calibration.n_boot=500",
            "train.threads=2",  # the same reductions whatever earlier tests set
        ],
    )
    out = tmp_path_factory.mktemp("heldout_run")
    run_training(cfg, out, log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def unseen(bundle: Path, pool: dict[str, Path]) -> dict[str, np.ndarray]:
    """The served default's predictions on the patients nothing of the bundle saw."""
    predictor = Predictor.from_run(bundle, device="cpu")
    with pool["unseen"].open(newline="") as f:
        rows = list(csv.DictReader(f))
    probs, raw = [], []
    for start in range(0, len(rows), 128):
        for res in predictor.predict_files([r["path"] for r in rows[start : start + 128]]):
            probs.append(res.probs)
            raw.append(res.raw_probs)
    y = np.array([predictor.classes.index(r["label"]) for r in rows])
    return {
        "probs": np.array(probs),
        "raw": np.array(raw),
        "y": y,
        "threshold": np.array(predictor.threshold),
    }


def _violations(p: np.ndarray, y: np.ndarray) -> list[dict]:
    """Bins whose observed rate's interval misses the mean predicted probability. The intervals
    are simultaneous (Bonferroni over the 5 bins): "every bin" is one claim, and five separate
    95% intervals would miss a perfectly calibrated model's mean in some bin 23% of the time."""
    rows = reliability_table(p, y, n_bins=5, equal_mass=True, alpha=0.05 / 5)
    return [r for r in rows if not r["observed_low"] <= r["predicted"] <= r["observed_high"]]


def test_calibrated_probabilities_match_observed_rates_in_every_bin(
    unseen: dict[str, np.ndarray],
) -> None:
    y = unseen["y"]
    assert 0.6 < y.mean() < 0.85  # the pool's prevalence, not the balanced sample's
    calibrated = _violations(unseen["probs"][:, 1], y)
    assert calibrated == [], calibrated
    # Class weighting pulled the raw probabilities towards 0.5: they miss the observed rates,
    # so this check is one that can fail.
    assert _violations(unseen["raw"][:, 1], y), "the raw class-weighted model looks calibrated"


def test_sensitivity_at_the_threshold_and_ece_fall_inside_the_stated_intervals(
    bundle: Path, unseen: dict[str, np.ndarray]
) -> None:
    entry = json.loads((bundle / "calibration.json").read_text())["configurations"]["folds"]
    stated = entry["validation"]
    p, y, t = unseen["probs"], unseen["y"], float(unseen["threshold"])
    sensitivity = float(np.mean(p[y == 1, 1] >= t))
    s = stated["at_threshold"]["sensitivity"]
    assert s["low"] <= sensitivity <= s["high"], (sensitivity, s)
    # Specificity rests on the few negatives of both sets (about a quarter of the pool), so the
    # unseen estimate carries its own sampling error: it must be consistent with the stated
    # interval once that error (2 binomial SE) is allowed for.
    negatives = int(np.sum(y == 0))
    specificity = float(np.mean(p[y == 0, 1] < t))
    se = float(np.sqrt(specificity * (1 - specificity) / negatives))
    sp = stated["at_threshold"]["specificity"]
    assert sp["low"] - 2 * se <= specificity <= sp["high"] + 2 * se, (specificity, se, sp)
    # ECE is biased upward on small samples; the bundle states it for its calibration set's
    # size, so compare like with like: the mean over unseen subsets of that size.
    n = entry["data"]["n_images"]
    rng = np.random.default_rng(0)
    subsets = [rng.choice(len(y), n, replace=False) for _ in range(50)]
    top = float(np.mean([ece(p[i], y[i])[0] for i in subsets]))
    assert stated["ece"]["low"] <= top <= stated["ece"]["high"], (top, stated["ece"])
    pos = float(np.mean([event_ece(p[i, 1], (y[i] == 1).astype(float)) for i in subsets]))
    e = stated["per_class"]["PNEUMONIA"]["ece"]
    assert e["low"] <= pos <= e["high"], (pos, e)
