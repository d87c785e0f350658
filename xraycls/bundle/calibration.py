"""Fitting a run bundle's calibration and operating threshold on its out-of-fold predictions.

The calibrator that ships in ``calibration.json`` is fitted on *all* out-of-fold logits. The
ECE it is reported with is cross-fitted: for each fold, a calibrator fitted on the other folds'
OOF logits is applied to that fold, so no case is scored by a calibrator that saw it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy.special import softmax

from xraycls.bundle.format import CALIBRATION_FILE, METRICS_FILE, OutOfFold, read_oof
from xraycls.evaluation.calibration import Method, fit_calibrator, save_calibration
from xraycls.evaluation.metrics import binary_metrics_at, ece, nll, threshold_for
from xraycls.io.files import json_safe, write_json_atomic

ThresholdTarget = Literal["sensitivity", "specificity", "youden"]


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
    save_calibration(run_dir / CALIBRATION_FILE, final, **extra)
    _update_metrics(run_dir, summary)
    return summary


def _update_metrics(run_dir: Path, summary: dict[str, Any]) -> None:
    path = run_dir / METRICS_FILE
    metrics = json.loads(path.read_text()) if path.exists() else {}
    metrics["calibration"] = summary
    write_json_atomic(path, metrics)
