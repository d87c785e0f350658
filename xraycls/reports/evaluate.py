"""``xraycls evaluate``: score a labelled set with a bundle, report metrics with CIs and plots.

Every metric is given before and after calibration, with patient-level stratified bootstrap
95% intervals where patient ids exist; binary sets are also scored at the bundle's stored
operating threshold (chosen on the training run's out-of-fold data, never on this set).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from xraycls.bundle.format import Bundle, Members
from xraycls.errors import ImageReadError
from xraycls.evaluation.metrics import (
    binary_metrics_at,
    bootstrap_ci,
    brier,
    classification_metrics,
    ece,
    nll,
    reliability_curve,
)
from xraycls.inference.predictor import Predictor
from xraycls.io.files import write_json_atomic
from xraycls.io.manifest import read_labels, write_table
from xraycls.io.preprocess import ImageCache

BATCH = 16


def evaluate_run(
    run_dir: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    label_column: str | None = None,
    members: Members = "auto",
    batch_size: int = BATCH,
    device: str = "auto",
    n_boot: int = 1000,
    cache_dir: str | Path | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Score the labels CSV (or ingest manifest) ``data`` with the bundle in ``run_dir``.

    Writes ``metrics.json``, ``predictions.csv`` and ROC / PR / reliability / confusion PNGs to
    ``out``. Unreadable images are listed with their error in ``predictions.csv`` and left out
    of the metrics.
    """
    run_dir, out = Path(run_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bundle = Bundle.read(run_dir)
    predictor = Predictor.from_run(bundle, members=members, device=device)
    column = label_column or bundle.label_column
    rows = [r for r in read_labels(data) if r.get("status", "ok") == "ok"]
    unknown = sorted({r.get(column, "") for r in rows} - set(predictor.classes) - {""})
    if unknown:
        raise ValueError(f"{data}: labels {unknown} are not classes of the run {predictor.classes}")
    rows = [r for r in rows if r.get(column)]
    cache = ImageCache(cache_dir) if cache_dir else None
    index = {c: i for i, c in enumerate(predictor.classes)}

    results: list[Any] = []
    for start in range(0, len(rows), batch_size):
        results += predictor.predict_files(
            [r["path"] for r in rows[start : start + batch_size]], cache=cache
        )
    pred_rows, probs, raw, labels, groups = [], [], [], [], []
    for r, res in zip(rows, results, strict=True):
        row: dict[str, Any] = {
            "path": r["path"],
            "label": r[column],
            "patient_id": r.get("patient_id", ""),
        }
        if isinstance(res, ImageReadError):
            row |= {"status": "error", "error": res.short()}
        else:
            row |= {"status": "ok", "predicted": res.predicted}
            row |= {f"prob_{c}": f"{res.probs[j]:.6f}" for j, c in enumerate(predictor.classes)}
            probs.append(res.probs)
            raw.append(res.raw_probs)
            labels.append(index[r[column]])
            groups.append(r.get("patient_id") or r["path"])
        pred_rows.append(row)
    cols = ["path", "status", "error", "label", "patient_id", "predicted"] + [
        f"prob_{c}" for c in predictor.classes
    ]
    write_table(out / "predictions.csv", pred_rows, cols)
    if not labels:
        raise ValueError(f"{data}: no readable labelled images")
    p, q, y, g = np.array(probs), np.array(raw), np.array(labels), np.array(groups)
    has_groups = any(r.get("patient_id") for r in rows)
    report = {
        "run": str(run_dir),
        "data": str(data),
        "n_images": len(y),
        "n_errors": int(sum(isinstance(x, ImageReadError) for x in results)),
        "classes": predictor.classes,
        "ci": f"95% stratified bootstrap, {n_boot} resamples, {'patient' if has_groups else 'image'}-level",
        "uncalibrated": _with_cis(q, y, g if has_groups else None, predictor.classes, n_boot),
        "calibrated": _with_cis(p, y, g if has_groups else None, predictor.classes, n_boot),
    }
    if len(predictor.classes) == 2 and predictor.threshold is not None:
        report["at_threshold"] = binary_metrics_at(p[:, 1], y, predictor.threshold)
    write_json_atomic(out / "metrics.json", report)
    _plots(out, p, q, y, predictor.classes, predictor.threshold)
    a = report["calibrated"]
    log(
        f"AUROC {a['auroc']['value']:.4f} [{a['auroc']['low']:.4f}, {a['auroc']['high']:.4f}], ECE {report['uncalibrated']['ece']['value']:.4f} -> {a['ece']['value']:.4f}"
    )
    return report


def _with_cis(
    probs: np.ndarray, y: np.ndarray, groups: np.ndarray | None, classes: list[str], n_boot: int
) -> dict[str, Any]:
    """Point values with bootstrap intervals for the headline metrics; the rest as points."""

    def metric(name: str) -> Any:
        if name == "brier":
            return brier
        if name == "nll":
            return nll
        if name == "ece":
            return lambda p, t: ece(p, t)[0]
        return lambda p, t: float(classification_metrics(p, t, classes)[name])

    out: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in (
            "auroc",
            "accuracy",
            "sensitivity",
            "specificity",
            "balanced_accuracy",
            "f1",
            "brier",
            "nll",
            "ece",
        ):
            value, low, high = bootstrap_ci(metric(name), probs, y, groups=groups, n_boot=n_boot)
            out[name] = {"value": value, "low": low, "high": high}
    points = classification_metrics(probs, y, classes)
    out["mce"] = ece(probs, y)[1]
    out["per_class"] = points.get("per_class")
    return out


def _plots(
    out: Path,
    p: np.ndarray,
    q: np.ndarray,
    y: np.ndarray,
    classes: list[str],
    threshold: float | None,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay, PrecisionRecallDisplay, RocCurveDisplay

    pos = len(classes) - 1 if len(classes) == 2 else None
    fig, ax = plt.subplots(figsize=(5, 5))
    for c, name in enumerate(classes):
        if pos is not None and c != pos:
            continue
        RocCurveDisplay.from_predictions(y == c, p[:, c], name=name, ax=ax)
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    fig.savefig(out / "roc.png", dpi=100, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 5))
    for c, name in enumerate(classes):
        if pos is not None and c != pos:
            continue
        PrecisionRecallDisplay.from_predictions(y == c, p[:, c], name=name, ax=ax)
    fig.savefig(out / "pr.png", dpi=100, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 5))
    for probs, name in ((q, "uncalibrated"), (p, "calibrated")):
        conf, acc = reliability_curve(probs, y)
        ax.plot(conf, acc, marker="o", label=f"{name} (ECE {ece(probs, y)[0]:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlabel="confidence (top label)", ylabel="accuracy", title="reliability, 15 bins")
    ax.legend()
    fig.savefig(out / "reliability.png", dpi=100, bbox_inches="tight")
    plt.close(fig)

    pred = (
        (p[:, 1] >= threshold).astype(int)
        if pos is not None and threshold is not None
        else p.argmax(1)
    )
    fig, ax = plt.subplots(figsize=(5, 5))
    ConfusionMatrixDisplay.from_predictions(
        y, pred, labels=list(range(len(classes))), display_labels=classes, ax=ax, colorbar=False
    )
    fig.savefig(out / "confusion.png", dpi=100, bbox_inches="tight")
    plt.close(fig)
