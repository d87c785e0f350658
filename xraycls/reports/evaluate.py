"""``xraycls evaluate``: score a labelled set with the served model and report what a reviewer
needs (TRIPOD+AI / CLAIM items that software can fill).

The images go through the same path as ``xraycls predict`` (:func:`xraycls.inference.rows
.load_item` and :func:`~xraycls.inference.rows.score_items`): ``predictions.csv`` holds predict's
row for every file plus its label, out-of-distribution flags included. The report gives, with
patient-level stratified bootstrap 95% intervals:

- discrimination: AUROC (and per class for more than two classes);
- calibration of the served probabilities: top-label ECE, Brier, NLL, and per class the ECE of
  P(class), calibration-in-the-large (intercept) and slope, with a reliability plot whose bins
  carry Wilson intervals;
- decisions: at the bundle's stored operating threshold (binary; chosen on the bundle's own
  calibration data, never on this set) and at argmax, side by side;
- a decision curve (net benefit against treat-all and treat-none; binary);
- subgroups (``by``: sex, age band, view, site, scanner...): the same headline metrics per
  subgroup, flagging those whose interval excludes the overall estimate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xraycls.bundle.calibration import interval
from xraycls.bundle.format import Bundle, BundleError, Members
from xraycls.evaluation.metrics import (
    FAST_METRICS,
    auroc,
    auroc_per_class,
    brier,
    decision_curve,
    ece,
    nll,
    per_class_calibration,
    reliability_table,
)
from xraycls.inference.predictor import Predictor
from xraycls.inference.rows import load_item, result_columns, score_items
from xraycls.io.files import write_json_atomic
from xraycls.io.manifest import read_labels, write_table

BATCH = 16
MIN_SUBGROUP = 10
"""Subgroups with fewer labelled images are listed with their size only."""


def evaluate_run(
    run_dir: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    label_column: str | None = None,
    members: Members = "auto",
    calibration: str | None = None,
    by: Sequence[str] = (),
    batch_size: int = BATCH,
    device: str = "auto",
    n_boot: int = 1000,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Score the labels CSV (or ingest manifest) ``data`` with the bundle's served model.

    Writes ``metrics.json``, ``predictions.csv`` and ROC / PR / reliability / confusion /
    decision-curve PNGs to ``out``. Unreadable images are listed with their error in
    ``predictions.csv`` and left out of the metrics.

    Raises:
        ValueError: Labels that are not the run's classes, a ``by`` column that does not exist,
            or no readable labelled image.
        BundleError: The bundle (or the named calibration) is unusable.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bundle = Bundle.read(run_dir)
    if bundle.multilabel:
        raise BundleError(
            f"{bundle.path}: a multi-label bundle; `xraycls evaluate` on an external labelled set "
            "handles one label per image only so far (the bundle's own per-finding validation is "
            "in MODEL_CARD.md and calibration.json)"
        )
    predictor = Predictor.from_run(bundle, members=members, calibration=calibration, device=device)
    column = label_column or bundle.label_column
    rows = _labelled_rows(data, column, predictor.classes, by)
    scored = _score(predictor, rows, column, batch_size)
    write_table(
        out / "predictions.csv",
        scored,
        [*result_columns(predictor.classes), "label", "patient_id", *by],
    )
    ok = [r for r in scored if r["status"] == "ok"]
    if not ok:
        raise ValueError(f"{data}: no readable labelled images")
    classes = predictor.classes
    p = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in ok])
    q = np.array([r["_raw"] for r in ok])
    y = np.array([classes.index(r["label"]) for r in ok])
    has_groups = any(r["patient_id"] for r in ok)
    g = np.array([r["patient_id"] or r["path"] for r in ok]) if has_groups else None
    report: dict[str, Any] = {
        "run": str(bundle.path),
        "data": str(data),
        "served": predictor.describe() | {"run": bundle.path.name},
        "is_calibrated": predictor.calibrated,
        "n_images": len(y),
        "n_errors": len(scored) - len(ok),
        "n_ood_flagged": sum(r["ood"] == "flagged" for r in ok),
        "classes": classes,
        "ci": f"95% stratified bootstrap, {n_boot} resamples, "
        f"{'patient' if has_groups else 'image'}-level",
        "uncalibrated": _headline(q, y, g, classes, None, n_boot),
        "calibrated": _headline(p, y, g, classes, predictor.threshold, n_boot),
        "per_class": per_class_calibration(p, y, classes),
    }
    report |= _decisions(p, y, g, classes, predictor.threshold, n_boot)
    if len(classes) == 2:
        report["calibration"] = {
            k: report["per_class"][classes[1]][k] for k in ("intercept", "slope")
        }
        report["decision_curve"] = decision_curve(p[:, 1], y == 1)
    report["subgroups"] = {
        col: _subgroups(ok, col, p, y, g, classes, predictor.threshold, report, n_boot)
        for col in by
    }
    write_json_atomic(out / "metrics.json", report)
    _plots(out, report, p, q, y, classes, predictor.threshold)
    log(_line(report, classes))
    return report


def _labelled_rows(
    data: str | Path, column: str, classes: list[str], by: Sequence[str]
) -> list[dict[str, str]]:
    rows = [r for r in read_labels(data) if r.get("status", "ok") == "ok"]
    if rows and column not in rows[0]:
        raise ValueError(
            f"{data}: no column {column!r} (--label-column); have {', '.join(rows[0])}"
        )
    missing = [c for c in by if rows and c not in rows[0]]
    if missing:
        raise ValueError(f"{data}: no column(s) {missing} for --by; have {', '.join(rows[0])}")
    unknown = sorted({r.get(column, "") for r in rows} - set(classes) - {""})
    if unknown:
        raise ValueError(f"{data}: labels {unknown} are not classes of the run {classes}")
    return [r for r in rows if r.get(column)]


def _score(
    predictor: Predictor, rows: list[dict[str, str]], column: str, batch_size: int
) -> list[dict[str, Any]]:
    """Predict's rows for every labelled file, plus the label and the raw probabilities."""
    out: list[dict[str, Any]] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        items = [load_item(r["path"], predictor.prep, ood=predictor.ood) for r in chunk]
        scored, preds = score_items(predictor, items)
        for r, row, pred in zip(chunk, scored, preds, strict=True):
            row |= {k: r.get(k, "") for k in r if k not in row and k != column}
            row |= {"label": r[column], "patient_id": r.get("patient_id", "")}
            row["_raw"] = pred.raw_probs if pred is not None else None
            out.append(row)
    return out


def _headline(
    probs: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray | None,
    classes: list[str],
    threshold: float | None,
    n_boot: int,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "auroc": interval(auroc, probs, y, groups, n_boot=n_boot),
        "ece": interval(lambda p, t: ece(p, t)[0], probs, y, groups, n_boot=n_boot, basic=True),
        "brier": interval(brier, probs, y, groups, n_boot=n_boot),
        "nll": interval(nll, probs, y, groups, n_boot=n_boot),
    }
    if len(classes) > 2:
        out["auroc_per_class"] = dict(
            zip(classes, map(float, auroc_per_class(probs, y)), strict=True)
        )
    return out


def _decisions(
    p: np.ndarray,
    y: np.ndarray,
    g: np.ndarray | None,
    classes: list[str],
    threshold: float | None,
    n_boot: int,
) -> dict[str, Any]:
    """Sensitivity and specificity at argmax and, for binary tasks, at the stored threshold."""
    out: dict[str, Any] = {
        "argmax": {
            m: interval(FAST_METRICS[m], p, y, g, n_boot=n_boot)
            for m in ("accuracy", "sensitivity", "specificity", "balanced_accuracy")
        }
    }
    if len(classes) == 2 and threshold is not None:
        d = (p[:, 1] >= threshold).astype(int)
        tp, fp = int(np.sum((d == 1) & (y == 1))), int(np.sum((d == 1) & (y == 0)))
        tn, fn = int(np.sum((d == 0) & (y == 0))), int(np.sum((d == 0) & (y == 1)))
        out["at_threshold"] = {
            "threshold": threshold,
            "sensitivity": interval(_sens, d, y, g, n_boot=n_boot),
            "specificity": interval(_spec, d, y, g, n_boot=n_boot),
            "ppv": tp / (tp + fp) if tp + fp else math.nan,
            "npv": tn / (tn + fn) if tn + fn else math.nan,
            "counts": {"tp": tp, "fp": fp, "tn": tn, "fn": fn},
        }
    return out


def _subgroups(
    rows: list[dict[str, Any]],
    column: str,
    p: np.ndarray,
    y: np.ndarray,
    g: np.ndarray | None,
    classes: list[str],
    threshold: float | None,
    overall: dict[str, Any],
    n_boot: int,
) -> dict[str, Any]:
    """The headline metrics per value of ``column``; ``flags`` names each metric whose
    subgroup interval excludes the overall estimate. Metrics undefined in a subgroup (AUROC or
    specificity where it holds one class only) are NaN and never flagged."""
    values = np.array([str(r.get(column, "")) for r in rows])
    out: dict[str, Any] = {}
    for value in sorted(set(values)):
        m = values == value
        entry: dict[str, Any] = {"n_images": int(m.sum())}
        if m.sum() < MIN_SUBGROUP:
            entry["note"] = f"fewer than {MIN_SUBGROUP} images: no intervals"
            out[value or "(blank)"] = entry
            continue
        gm = g[m] if g is not None else None
        entry |= _headline(p[m], y[m], gm, classes, threshold, n_boot)
        entry |= _decisions(p[m], y[m], gm, classes, threshold, n_boot)
        entry["flags"] = _flags(entry, overall)
        out[value or "(blank)"] = entry
    return out


def _flags(entry: dict[str, Any], overall: dict[str, Any]) -> list[str]:
    pairs = [
        ("auroc", entry.get("auroc"), overall["calibrated"]["auroc"]),
        ("ece", entry.get("ece"), overall["calibrated"]["ece"]),
    ]
    at, at_all = entry.get("at_threshold"), overall.get("at_threshold")
    if at and at_all:
        pairs += [(k, at[k], at_all[k]) for k in ("sensitivity", "specificity")]
    flags = []
    for name, sub, ref in pairs:
        known = sub and ref and math.isfinite(sub["low"]) and math.isfinite(ref["value"])
        if known and not sub["low"] <= ref["value"] <= sub["high"]:
            flags.append(name)
    return flags


def _sens(d: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(d[y == 1] == 1)) if np.any(y == 1) else math.nan


def _spec(d: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(d[y == 0] == 0)) if np.any(y == 0) else math.nan


def _line(report: dict[str, Any], classes: list[str]) -> str:
    a = report["calibrated"]

    def ci(d: dict[str, float]) -> str:
        return f"{d['value']:.4f} [{d['low']:.4f}, {d['high']:.4f}]"

    line = (
        f"{report['n_images']} images ({report['n_errors']} unreadable, {report['n_ood_flagged']} "
        f"flagged out-of-distribution): AUROC {ci(a['auroc'])}, ECE {ci(a['ece'])}"
    )
    if "calibration" in report:
        c = report["calibration"]
        line += f", calibration intercept {c['intercept']:.2f} slope {c['slope']:.2f}"
    if "at_threshold" in report:
        t = report["at_threshold"]
        line += (
            f"; at the stored threshold {t['threshold']:.3f}: sensitivity {ci(t['sensitivity'])},"
            f" specificity {ci(t['specificity'])}"
        )
    flagged = [
        f"{col}={v}"
        for col, groups in report["subgroups"].items()
        for v, e in groups.items()
        if e.get("flags")
    ]
    if flagged:
        line += f"; subgroups whose interval excludes the overall estimate: {', '.join(flagged)}"
    return line


def _plots(
    out: Path,
    report: dict[str, Any],
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

    shown = [1] if len(classes) == 2 else list(range(len(classes)))
    fig, ax = plt.subplots(figsize=(5, 5))
    for c in shown:
        RocCurveDisplay.from_predictions(y == c, p[:, c], name=classes[c], ax=ax)
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    fig.savefig(out / "roc.png", dpi=100, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 5))
    for c in shown:
        PrecisionRecallDisplay.from_predictions(y == c, p[:, c], name=classes[c], ax=ax)
    fig.savefig(out / "pr.png", dpi=100, bbox_inches="tight")
    plt.close(fig)

    fig, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 5), squeeze=False)
    for ax, c in zip(axes[0], shown, strict=True):
        for probs, name, style in ((q, "uncalibrated", "s--"), (p, "served (calibrated)", "o-")):
            rows = reliability_table(probs[:, c], (y == c).astype(float))
            x = [r["predicted"] for r in rows]
            obs = [r["observed"] for r in rows]
            err = [
                [r["observed"] - r["observed_low"] for r in rows],
                [r["observed_high"] - r["observed"] for r in rows],
            ]
            ax.errorbar(x, obs, yerr=err, fmt=style, capsize=3, label=name)
        ax.plot([0, 1], [0, 1], "k:", lw=1)
        ax.set(
            xlabel=f"predicted P({classes[c]})",
            ylabel=f"observed rate of {classes[c]}",
            title=f"reliability of P({classes[c]}), 10 bins, Wilson 95%",
        )
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=100)
    plt.close(fig)

    pred = (
        (p[:, 1] >= threshold).astype(int)
        if len(classes) == 2 and threshold is not None
        else p.argmax(1)
    )
    fig, ax = plt.subplots(figsize=(5, 5))
    ConfusionMatrixDisplay.from_predictions(
        y, pred, labels=list(range(len(classes))), display_labels=classes, ax=ax, colorbar=False
    )
    fig.savefig(out / "confusion.png", dpi=100, bbox_inches="tight")
    plt.close(fig)

    if "decision_curve" in report:
        dc = report["decision_curve"]
        fig, ax = plt.subplots(figsize=(6, 4.5))
        ax.plot(dc["threshold"], dc["model"], label="served model")
        ax.plot(dc["threshold"], dc["treat_all"], "--", label="treat all")
        ax.axhline(0.0, color="k", lw=1, label="treat none")
        if threshold is not None:
            ax.axvline(threshold, color="grey", ls=":", label=f"stored threshold {threshold:.2f}")
        top = max(max(dc["model"]), max(dc["treat_all"]), 0.05)
        ax.set(
            ylim=(-0.05 * top, 1.1 * top),
            xlabel=f"threshold probability of {classes[1]}",
            ylabel="net benefit",
            title="decision curve",
        )
        ax.legend()
        fig.savefig(out / "decision_curve.png", dpi=100, bbox_inches="tight")
        plt.close(fig)
