"""Calibrating what a bundle serves, and measuring it on data it never saw.

A bundle can serve two configurations: the fold ensemble (mean logits of the cross-validation
models) and the refit model (one model trained on all development data). Neither saw the
**calibration holdout**: patients set aside before cross-validation (``cv.calibration_holdout``).
Each configuration's logits on the holdout are what its calibrator and operating threshold are
fitted on, so the probability and threshold shipped belong to the model that produces them.
(Fitting one calibrator on single fold models' out-of-fold logits and applying it to the
ensemble's mean logits, as format 1 did, miscalibrates the ensemble: averaging shrinks logits.)

Validation is **cross-fitted within the holdout**: the holdout's patients are split into parts;
each part is scored by a calibrator and a threshold fitted on the other parts, and the pooled
scores give ECE, Brier, NLL, per-class calibration (ECE, intercept, slope, reliability) and, for
binary tasks, sensitivity and specificity at the threshold, each with a patient-level bootstrap
interval. The calibrator shipped is then fitted on the whole holdout.

The method is chosen, not assumed: ``auto`` compares temperature scaling (no intercept) with
Platt scaling (binary) or vector scaling (multi-class), which have intercepts, by their
cross-fitted NLL. Class weighting shifts the logits' intercept; only a calibrator with an
intercept can undo that.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np

from xraycls.bundle.format import (
    CALIBRATION_FILE,
    FORMAT,
    HOLDOUT_FILE,
    METRICS_FILE,
    SITE_CALIBRATIONS,
    Bundle,
    BundleError,
    OutOfFold,
    ServedPredictions,
    read_served,
)
from xraycls.evaluation.calibration import (
    Calibrator,
    Method,
    calibrator_from_dict,
    candidate_methods,
    fit_calibrator,
)
from xraycls.evaluation.metrics import (
    auroc,
    binary_metrics_at,
    bootstrap_ci,
    brier,
    ece,
    event_ece,
    nll,
    per_class_calibration,
    softmax,
    threshold_for,
)
from xraycls.evaluation.splits import patient_folds
from xraycls.io.files import json_safe, write_json_atomic

ThresholdTarget = Literal["sensitivity", "specificity", "youden"]
MethodChoice = Literal["auto", "temperature", "platt", "vector", "isotonic"]
N_PARTS = 5


def crossfit_probs(oof: OutOfFold, method: Method = "temperature") -> np.ndarray:
    """Calibrated OOF probabilities in which no case is scored by a calibrator that saw it.

    Each fold's logits go through a calibrator fitted on the other folds' OOF logits. Used to
    compare the fold models of several runs (``xraycls compare``); what a bundle serves is
    calibrated on its holdout (:func:`fit_configuration`).
    """
    crossfit = np.zeros(oof.logits.shape, np.float64)
    for k in np.unique(oof.folds):
        held = oof.folds == k
        cal = fit_calibrator(method, oof.logits[~held], oof.labels[~held])
        crossfit[held] = cal.predict_proba(oof.logits[held])
    return crossfit


def calibration_parts(labels: np.ndarray, groups: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """Patient-grouped, label-stratified parts of a calibration set for cross-fitting (up to
    :data:`N_PARTS`, fewer when there are few patients of a class)."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    per_class = min(len(np.unique(groups[labels == c])) for c in np.unique(labels))
    n_parts = max(2, min(N_PARTS, per_class))
    if per_class < 2:
        raise BundleError(
            f"calibration data has fewer than 2 patients of some class ({per_class}); it cannot "
            "be cross-fitted: use a larger holdout or labelled set"
        )
    return patient_folds(labels, groups, folds=n_parts, seed=seed)


def fit_configuration(
    pred: ServedPredictions,
    configuration: str,
    *,
    method: MethodChoice = "auto",
    threshold_target: ThresholdTarget = "sensitivity",
    threshold_value: float | None = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Fit one configuration's calibrator and threshold on ``pred`` and validate them there by
    cross-fitting (see the module docstring).

    Returns:
        The configuration's entry of ``calibration.json``: ``calibrator``, ``method`` and how it
        was selected, ``threshold`` (binary tasks), ``data`` and ``validation``.
    """
    z, y, groups = pred.logits[configuration], pred.labels, pred.groups
    classes = pred.classes
    parts = calibration_parts(y, groups, seed=seed)
    candidates = candidate_methods(len(classes)) if method == "auto" else [method]
    crossfit: dict[str, np.ndarray] = {m: _crossfit(m, z, y, parts) for m in candidates}
    scores = {m: nll(p, y) for m, p in crossfit.items()}
    chosen = min(scores, key=lambda m: scores[m])
    final = fit_calibrator(chosen, z, y)  # type: ignore[arg-type]
    threshold = None
    if len(classes) == 2:
        t = threshold_for(
            final.predict_proba(z)[:, 1], y, target=threshold_target, value=threshold_value
        )
        threshold = {
            "positive": classes[1],
            "target": threshold_target,
            "value": threshold_value,
            "threshold": t,
        }
    validation = _validate(
        raw=softmax(z),
        calibrated=crossfit[chosen],
        decisions=_crossfit_decisions(chosen, z, y, parts, threshold_target, threshold_value)
        if threshold
        else None,
        y=y,
        groups=groups,
        classes=classes,
        n_boot=n_boot,
    )
    return {
        "configuration": configuration,
        "calibrator": final.to_dict(),
        "method": chosen,
        "selection": {
            "criterion": "cross-fitted NLL (lower is better)",
            "candidates": scores,
        },
        "threshold": threshold,
        "data": {
            "source": pred.source,
            "n_images": len(y),
            "n_patients": len(np.unique(groups)),
            "class_counts": {c: int(np.sum(y == i)) for i, c in enumerate(classes)},
        },
        "validation": validation
        | {
            "protocol": f"cross-fitted: {parts.max() + 1} patient-grouped parts of the "
            f"{pred.source}; each part scored by a calibrator"
            + (" and a threshold" if threshold else "")
            + f" fitted on the other parts; 95% patient-level bootstrap intervals ({n_boot})",
        },
    }


def fit_multilabel_configuration(
    pred: ServedPredictions,
    configuration: str,
    *,
    method: MethodChoice = "auto",
    threshold_target: ThresholdTarget = "sensitivity",
    threshold_value: float | None = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """:func:`fit_configuration` for findings: each finding is its own binary problem (its
    sigmoid logit ``z`` is the margin of the two logits ``[0, z]``), calibrated (temperature
    or Platt, chosen by cross-fitted NLL), given an operating threshold and validated by
    cross-fitting on the images whose label for it is known.

    Raises:
        BundleError: A finding has fewer than 2 positive (or negative) patients in the data,
            so it cannot be cross-fitted; the message names it.
    """
    findings: dict[str, dict[str, Any]] = {}
    z_all, y_all = pred.logits[configuration], np.asarray(pred.labels, np.float64)
    for j, f in enumerate(pred.classes):
        known = ~np.isnan(y_all[:, j])
        z = z_all[known, j]
        sub = ServedPredictions(
            paths=[p for p, k in zip(pred.paths, known, strict=True) if k],
            groups=pred.groups[known],
            labels=y_all[known, j].astype(np.int64),
            classes=[f"not {f}", f],
            logits={configuration: np.column_stack([np.zeros_like(z), z])},
            source=pred.source,
        )
        try:
            findings[f] = fit_configuration(
                sub,
                configuration,
                method=method,
                threshold_target=threshold_target,
                threshold_value=threshold_value,
                n_boot=n_boot,
                seed=seed,
            )
        except BundleError as e:
            raise BundleError(f"finding {f!r}: {e}") from e
    macro = {
        k: float(np.nanmean([e["validation"][k]["value"] for e in findings.values()]))
        for k in ("auroc", "ece", "ece_uncalibrated", "brier")
    }
    methods = sorted({e["method"] for e in findings.values()})
    return {
        "configuration": configuration,
        "task": "multilabel",
        "method": "per finding: " + ", ".join(methods),
        "findings": findings,
        "threshold": None,
        "data": {
            "source": pred.source,
            "n_images": len(y_all),
            "n_patients": len(np.unique(pred.groups)),
            "positives": {f: int(np.nansum(y_all[:, j])) for j, f in enumerate(pred.classes)},
        },
        "validation": {"macro": macro},
    }


def calibrate_run(
    run_dir: str | Path,
    *,
    method: MethodChoice = "auto",
    threshold_target: ThresholdTarget = "sensitivity",
    threshold_value: float | None = 0.95,
    n_boot: int = 1000,
) -> dict[str, Any]:
    """(Re)fit every served configuration of a run on its calibration holdout.

    Writes ``calibration.json`` (format 2; the fold ensemble is the default when present) and
    a ``served`` summary into ``metrics.json``.

    Raises:
        BundleError: The run has no holdout predictions (trained with
            ``cv.calibration_holdout: 0`` or by an older version).
    """
    bundle = Bundle.read(run_dir)
    path = bundle.file(HOLDOUT_FILE)
    if not path.exists():
        raise BundleError(
            f"{bundle.path}: no {HOLDOUT_FILE}: no image of this run was kept from all of its "
            "models, so nothing can calibrate what it serves. Retrain with "
            "cv.calibration_holdout > 0, or calibrate on a local labelled set with "
            "`xraycls calibrate RUN --on LABELS.csv --name SITE`"
        )
    pred = read_served(path, list(bundle.classes))
    fit = fit_multilabel_configuration if bundle.multilabel else fit_configuration
    entries = {
        k: fit(
            pred,
            k,
            method=method,
            threshold_target=threshold_target,
            threshold_value=threshold_value,
            n_boot=n_boot,
        )
        for k in sorted(pred.logits)
    }
    default = "folds" if "folds" in entries else next(iter(entries))
    save_calibration_file(bundle.file(CALIBRATION_FILE), entries, default=default)
    summary = {"default": default, "configurations": {k: _summary(e) for k, e in entries.items()}}
    metrics_path = bundle.file(METRICS_FILE)
    metrics = bundle.metrics()
    write_json_atomic(metrics_path, metrics | {"served": summary})
    return {"default": default, "configurations": entries}


def served_line(configuration: str, entry: dict[str, Any]) -> str:
    """One line for a log: a configuration's calibration and its cross-fitted validation."""
    v = entry["validation"]
    name = {"folds": "fold ensemble", "refit": "refit model"}.get(configuration, configuration)
    if entry.get("task") == "multilabel":
        m = v["macro"]
        return (
            f"served {name} on {entry['data']['n_images']} {entry['data']['source']} images: "
            f"macro AUROC {m['auroc']:.3f} over {len(entry['findings'])} findings; calibration "
            f"{entry['method']}, macro ECE {m['ece_uncalibrated']:.3f} -> {m['ece']:.3f} "
            "(cross-fitted); one operating threshold per finding"
        )
    line = (
        f"served {name} on {entry['data']['n_images']} {entry['data']['source']} images: AUROC "
        f"{_fmt(v['auroc'])}; {entry['method']} calibration, ECE {v['ece_uncalibrated']['value']:.3f}"
        f" -> {_fmt(v['ece'])} (cross-fitted)"
    )
    if entry.get("threshold"):
        at = v["at_threshold"]
        line += (
            f"; threshold {entry['threshold']['threshold']:.3f}: sensitivity "
            f"{_fmt(at['sensitivity'])}, specificity {_fmt(at['specificity'])}"
        )
    return line


def _fmt(ci: dict[str, float]) -> str:
    return f"{ci['value']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]"


def save_calibration_file(
    path: Path, entries: dict[str, dict[str, Any]], *, default: str, **extra: Any
) -> Path:
    """Write a calibration file (the bundle's or a site's) atomically."""
    return write_json_atomic(
        path,
        json_safe({"format": FORMAT, "default": default, **extra, "configurations": entries}),
    )


def site_calibration_path(bundle: Bundle, name: str) -> Path:
    """Where the site calibration ``name`` lives; names are plain words (letters, digits,
    ``-``, ``_``), so that they are safe as file names.

    Raises:
        BundleError: An unsafe name, or ``default`` (the bundle's own calibration).
    """
    if not name or name == "default" or not all(ch.isalnum() or ch in "-_" for ch in name):
        raise BundleError(
            f"site calibration name {name!r}: use letters, digits, '-' or '_' (not 'default')"
        )
    return bundle.path / SITE_CALIBRATIONS / f"{name}.json"


def load_configuration(
    bundle: Bundle, members: str, *, calibration: str | None = None
) -> tuple[Calibrator | FindingCalibration | None, float | None, dict[str, Any] | None]:
    """The calibrator, threshold and stored entry of a configuration (None, None, None when the
    bundle (or the named calibration) does not calibrate that configuration). A multi-label
    configuration gives a :class:`FindingCalibration` (its thresholds inside) and no threshold.

    Raises:
        BundleError: A named calibration does not exist or is of an older format.
    """
    data = bundle.calibration(calibration)
    entry = (data or {}).get("configurations", {}).get(members)
    if entry is None:
        if calibration not in (None, "", "default"):
            raise BundleError(
                f"{bundle.path}: site calibration {calibration!r} does not calibrate the "
                f"{members!r} configuration (it has: {', '.join((data or {}).get('configurations', {}))})"
            )
        return None, None, None
    if entry.get("task") == "multilabel":
        cal = FindingCalibration.from_entry(entry, list(bundle.classes))
        return cal, None, entry
    threshold = (entry.get("threshold") or {}).get("threshold")
    return calibrator_from_dict(entry["calibrator"]), threshold, entry


class FindingCalibration:
    """The calibrators and operating thresholds of a multi-label configuration, one per
    finding (:func:`fit_multilabel_configuration`)."""

    def __init__(
        self, findings: list[str], calibrators: list[Calibrator], thresholds: np.ndarray
    ) -> None:
        self.findings, self.calibrators, self.thresholds = findings, calibrators, thresholds

    @classmethod
    def from_entry(cls, entry: dict[str, Any], findings: list[str]) -> FindingCalibration:
        """From a stored multi-label configuration entry.

        Raises:
            BundleError: A finding of the bundle has no calibration in the entry.
        """
        stored = entry.get("findings") or {}
        missing = [f for f in findings if f not in stored]
        if missing:
            raise BundleError(f"multi-label calibration lacks findings {missing}")
        return cls(
            findings,
            [calibrator_from_dict(stored[f]["calibrator"]) for f in findings],
            np.array(
                [(stored[f].get("threshold") or {}).get("threshold", np.nan) for f in findings],
                dtype=np.float64,
            ),
        )

    @property
    def method(self) -> str:
        """E.g. ``per finding: platt, temperature``."""
        return "per finding: " + ", ".join(sorted({c.method for c in self.calibrators}))

    def predict_proba(self, logits: np.ndarray) -> np.ndarray:
        """N x K calibrated probabilities of N x K sigmoid logits."""
        z = np.atleast_2d(np.asarray(logits, dtype=np.float64))
        return np.column_stack(
            [
                c.predict_proba(np.column_stack([np.zeros(len(z)), z[:, j]]))[:, 1]
                for j, c in enumerate(self.calibrators)
            ]
        )


# --------------------------------------------------------------------------- cross-fitting


def _crossfit(method: str, z: np.ndarray, y: np.ndarray, parts: np.ndarray) -> np.ndarray:
    out = np.zeros(z.shape, np.float64)
    for k in np.unique(parts):
        held = parts == k
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence chatter on small parts
            cal = fit_calibrator(method, z[~held], y[~held])  # type: ignore[arg-type]
        out[held] = cal.predict_proba(z[held])
    return out


def _crossfit_decisions(
    method: str,
    z: np.ndarray,
    y: np.ndarray,
    parts: np.ndarray,
    target: ThresholdTarget,
    value: float | None,
) -> np.ndarray:
    """Binary decisions in which each part is thresholded by a calibrator and a threshold both
    fitted on the other parts: what the shipped operating point does on new patients."""
    decisions = np.zeros(len(y), dtype=np.int64)
    for k in np.unique(parts):
        held = parts == k
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cal = fit_calibrator(method, z[~held], y[~held])  # type: ignore[arg-type]
        t = threshold_for(cal.predict_proba(z[~held])[:, 1], y[~held], target=target, value=value)
        decisions[held] = (cal.predict_proba(z[held])[:, 1] >= t).astype(np.int64)
    return decisions


def _validate(
    *,
    raw: np.ndarray,
    calibrated: np.ndarray,
    decisions: np.ndarray | None,
    y: np.ndarray,
    groups: np.ndarray,
    classes: list[str],
    n_boot: int,
) -> dict[str, Any]:
    def ci(
        metric: Callable[[np.ndarray, np.ndarray], float], values: np.ndarray, **kw: Any
    ) -> dict:
        return interval(metric, values, y, groups, n_boot=n_boot, **kw)

    out: dict[str, Any] = {
        "auroc": ci(auroc, raw),
        "ece_uncalibrated": ci(lambda p, t: ece(p, t)[0], raw, basic=True),
        "ece": ci(lambda p, t: ece(p, t)[0], calibrated, basic=True),
        "brier": ci(brier, calibrated),
        "nll": ci(nll, calibrated),
        "accuracy_argmax": ci(lambda p, t: float(np.mean(p.argmax(1) == t)), calibrated),
        "per_class": per_class_calibration(calibrated, y, classes),
    }
    for c, name in enumerate(classes):
        out["per_class"][name]["ece"] = ci(
            lambda p, t, c=c: event_ece(p[:, c], (t == c).astype(float)), calibrated, basic=True
        )
    if decisions is not None:
        point = binary_metrics_at(decisions.astype(float), y, 0.5)
        out["at_threshold"] = {
            "sensitivity": ci(_sensitivity, decisions),
            "specificity": ci(_specificity, decisions),
            "ppv": point["ppv"],
            "npv": point["npv"],
            "counts": {k: point[k] for k in ("tp", "fp", "tn", "fn")},
        }
    return out


def interval(
    metric: Callable[[np.ndarray, np.ndarray], float],
    values: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray | None,
    *,
    n_boot: int = 1000,
    basic: bool = False,
) -> dict[str, float]:
    """``{value, low, high}``: a metric with its patient-level stratified bootstrap 95% interval
    (NaN where it is undefined; ``basic`` for calibration errors, see :func:`bootstrap_ci`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            v, lo, hi = bootstrap_ci(metric, values, y, groups=groups, n_boot=n_boot, basic=basic)
        except ValueError:
            return {"value": math.nan, "low": math.nan, "high": math.nan}
    return {"value": v, "low": lo, "high": hi}


def _sensitivity(d: np.ndarray, y: np.ndarray) -> float:
    pos = y == 1
    return float(np.mean(d[pos] == 1)) if pos.any() else math.nan


def _specificity(d: np.ndarray, y: np.ndarray) -> float:
    neg = y == 0
    return float(np.mean(d[neg] == 0)) if neg.any() else math.nan


def _summary(entry: dict[str, Any]) -> dict[str, Any]:
    """The headline of a configuration's calibration, for ``metrics.json``."""
    v = entry["validation"]
    if entry.get("task") == "multilabel":
        return {
            "method": entry["method"],
            "data": entry["data"],
            "macro": v["macro"],
            "findings": {f: _summary(e) for f, e in entry["findings"].items()},
        }
    out = {
        "method": entry["method"],
        "data": entry["data"],
        "auroc": v["auroc"],
        "ece": v["ece"],
        "ece_uncalibrated": v["ece_uncalibrated"],
        "brier": v["brier"],
        "per_class_ece": {c: d["ece"] for c, d in v["per_class"].items()},
    }
    if entry.get("threshold"):
        out["threshold"] = entry["threshold"]["threshold"]
        out["at_threshold"] = {k: v["at_threshold"][k] for k in ("sensitivity", "specificity")}
    return out
