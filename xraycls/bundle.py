"""Reading a run bundle and fitting its calibration from the out-of-fold predictions.

The calibrator that ships in ``calibration.json`` is fitted on *all* out-of-fold logits. The
ECE it is reported with is cross-fitted: for each fold, a calibrator fitted on the other folds'
OOF logits is applied to that fold, so no case is scored by a calibrator that saw it.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy.special import softmax

from xraycls.calibrate import Method, fit_calibrator, save_calibration
from xraycls.fsutil import json_safe, write_json_atomic
from xraycls.metrics import binary_metrics_at, ece, nll, threshold_for

ThresholdTarget = Literal["sensitivity", "specificity", "youden"]


class BundleError(ValueError):
    """A run folder is missing a file or holds an inconsistent one; the message names it."""


@dataclass
class OutOfFold:
    """A run's pooled out-of-fold predictions (``oof_predictions.csv``)."""

    paths: list[str]
    groups: np.ndarray
    labels: np.ndarray
    folds: np.ndarray
    logits: np.ndarray
    classes: list[str]
    floor: np.ndarray | None = None
    """The 32x32 logistic-regression floor's OOF probabilities on the same folds, if stored."""


def read_oof(run_dir: str | Path) -> OutOfFold:
    """Read ``oof_predictions.csv`` and ``labels.json`` of a run.

    Raises:
        BundleError: A file is missing or lacks the logit columns.
    """
    run_dir = Path(run_dir)
    try:
        classes = json.loads((run_dir / "labels.json").read_text())["classes"]
        with (run_dir / "oof_predictions.csv").open(newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, ValueError, KeyError) as e:
        raise BundleError(f"{run_dir}: not a complete run bundle ({e})") from e
    missing = [f"logit_{c}" for c in classes if rows and f"logit_{c}" not in rows[0]]
    if missing or not rows:
        raise BundleError(f"{run_dir / 'oof_predictions.csv'}: no rows or no columns {missing}")
    index = {c: i for i, c in enumerate(classes)}
    return OutOfFold(
        paths=[r["path"] for r in rows],
        groups=np.array([r["patient_id"] for r in rows]),
        labels=np.array([index[r["label"]] for r in rows], dtype=np.int64),
        folds=np.array([int(r["fold"]) for r in rows], dtype=np.int64),
        logits=np.array(
            [[float(r[f"logit_{c}"]) for c in classes] for r in rows], dtype=np.float64
        ),
        classes=classes,
        floor=np.array([[float(r[f"floor_prob_{c}"]) for c in classes] for r in rows])
        if f"floor_prob_{classes[0]}" in rows[0]
        else None,
    )


def crossfit_probs(oof: OutOfFold, method: Method = "temperature") -> np.ndarray:
    """Calibrated OOF probabilities in which no case is scored by a calibrator that saw it.

    Each fold's logits go through a calibrator fitted on the other folds' OOF logits: the
    honest estimate of how the shipped calibrator (fitted on all of them) does on new data.
    """
    crossfit = np.zeros(oof.logits.shape, np.float64)
    for k in np.unique(oof.folds):
        held = oof.folds == k
        cal = fit_calibrator(method, oof.logits[~held], oof.labels[~held])
        crossfit[held] = cal.predict_proba(oof.logits[held])
    return crossfit


def calibrate_run(
    run_dir: str | Path,
    *,
    method: Method = "temperature",
    threshold_target: ThresholdTarget = "sensitivity",
    threshold_value: float | None = 0.95,
) -> dict[str, Any]:
    """Fit the run's calibrator (and, for binary runs, its operating threshold) on OOF logits.

    Writes ``calibration.json`` and a ``calibration`` section into ``metrics.json``.

    Args:
        run_dir: A finished ``xraycls train`` run.
        method: ``temperature`` (any number of classes), ``platt`` or ``isotonic`` (binary).
        threshold_target: How to pick the binary operating point on calibrated OOF
            probabilities: a target ``sensitivity`` or ``specificity``, or ``youden``.
        threshold_value: The target rate (None for Youden).

    Returns:
        The summary stored in ``metrics.json``.
    """
    run_dir = Path(run_dir)
    oof = read_oof(run_dir)
    raw = softmax(oof.logits, axis=1)
    crossfit = crossfit_probs(oof, method)
    final = fit_calibrator(method, oof.logits, oof.labels)
    calibrated = final.predict_proba(oof.logits)

    summary: dict[str, Any] = {
        "method": method,
        "fitted_on": "out-of-fold logits",
        "n": len(oof.labels),
    }
    for name, p in (("before", raw), ("after_crossfit", crossfit)):
        e, m = ece(p, oof.labels)
        ea, ma = ece(p, oof.labels, adaptive=True)
        summary[name] = {
            "ece": e,
            "mce": m,
            "ece_adaptive": ea,
            "mce_adaptive": ma,
            "nll": nll(p, oof.labels),
        }
    summary["calibrator"] = final.to_dict()
    extra: dict[str, Any] = {"classes": oof.classes, "summary": json_safe(summary)}
    if len(oof.classes) == 2:
        t = threshold_for(
            calibrated[:, 1], oof.labels, target=threshold_target, value=threshold_value
        )
        if math.isfinite(t):
            point = binary_metrics_at(calibrated[:, 1], oof.labels, t)
            summary["threshold"] = {
                "positive": oof.classes[1],
                "target": threshold_target,
                "value": threshold_value,
                "threshold": t,
                "oof_at_threshold": point,
            }
            extra["threshold"] = json_safe(summary["threshold"])
    save_calibration(run_dir / "calibration.json", final, **extra)
    _update_metrics(run_dir, summary)
    return summary


def _update_metrics(run_dir: Path, summary: dict[str, Any]) -> None:
    path = run_dir / "metrics.json"
    metrics = json.loads(path.read_text()) if path.exists() else {}
    metrics["calibration"] = summary
    write_json_atomic(path, metrics)
