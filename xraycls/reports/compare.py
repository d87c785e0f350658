"""``xraycls compare``: several runs on the same data, side by side, with honest uncertainty.

(One module of ~560 lines because it is one report: alignment, the statistics per run and per
pair, the plots and the Markdown rendering share the report's data structure.)

Every number comes from the runs' pooled out-of-fold (OOF) predictions, so no case is scored by
a model, a calibrator or a threshold that saw it:

- **Discrimination** (AUROC and its difference to the baseline and to the floor) uses the raw
  OOF probabilities. Intervals are 95% patient-level stratified bootstrap intervals; the
  difference between two models is bootstrapped *paired* (the same resampled patients for
  both), and the DeLong test (image level, per class one-vs-rest for multi-class) gives the
  p-value. No correction for multiple comparisons is applied: the report says how many tests
  it shows.
- **Calibration** (ECE, 15 equal-width bins) before and after the run's calibrator, which is
  cross-fitted: each fold is calibrated by a calibrator fitted on the other folds.
- **The operating point** (binary) is cross-fitted too: for each fold the threshold for the
  run's target (e.g. 95% sensitivity) is chosen on the other folds' calibrated OOF
  probabilities and applied to the held-out fold. Multi-class runs decide by argmax and report
  macro sensitivity / specificity.
- **The floor** is the logistic regression on 32x32 pixels that every run fits on its own folds
  (``floor_prob_*`` in ``oof_predictions.csv``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from xraycls.bundle.calibration import crossfit_probs
from xraycls.bundle.format import Bundle, BundleError, OutOfFold
from xraycls.evaluation.calibration import fit_calibrator
from xraycls.evaluation.metrics import (
    FAST_METRICS,
    auroc,
    auroc_per_class,
    bootstrap_ci,
    delong_test,
    ece,
    per_class_calibration,
    reliability_curve,
    softmax,
    threshold_for,
)
from xraycls.io.files import json_safe, write_json_atomic, write_text_atomic

FLOOR = "floor (LR on 32x32 pixels)"


@dataclass
class RunView:
    """One run's aligned OOF predictions and what the report says about it."""

    name: str
    path: Path | None
    model: str
    image_size: int | None
    params: int | None
    raw: np.ndarray
    """Uncalibrated OOF probabilities (N x C), rows in the comparison's common order."""
    calibrated: np.ndarray
    """Cross-fitted calibrated OOF probabilities (the floor's own probabilities for the floor)."""
    decisions: np.ndarray
    """Cross-fitted decisions at the operating point (class indices)."""
    floor: np.ndarray | None
    folds: np.ndarray
    calibration_method: str | None
    threshold_rule: str
    metrics: dict[str, Any] = field(default_factory=dict)


def compare_runs(
    run_dirs: list[str | Path],
    out: str | Path,
    *,
    baseline: str | None = None,
    n_boot: int = 1000,
    log: Any = print,
) -> dict[str, Any]:
    """Compare finished ``xraycls train`` runs that share a data set and labels.

    Writes ``report.md``, ``report.json``, ``roc.png`` and ``reliability.png`` to ``out``.

    Args:
        run_dirs: Two or more run folders (one is enough for a model-vs-floor report).
        out: The report folder (created).
        baseline: Run folder name or backbone name to compare against (default: the run whose
            backbone is a ResNet50, else the first run).
        n_boot: Bootstrap resamples for the intervals.
        log: Progress messages.

    Raises:
        BundleError: A run is incomplete, or the runs do not share images, labels or classes.
    """
    out = Path(out)
    oofs = [(Path(d), Bundle.read(d).oof()) for d in run_dirs]
    if not oofs:
        raise BundleError("no runs to compare")
    names = _unique_names([d for d, _ in oofs])
    tasks = {oof.labels.ndim for _, oof in oofs}
    if tasks == {2}:
        from xraycls.reports.findings import compare_findings

        wanted = next(
            (n for n, (d, _) in zip(names, oofs, strict=True) if baseline in (n, d.name)), None
        )
        runs = [(n, d, oof) for n, (d, oof) in zip(names, oofs, strict=True)]
        return compare_findings(runs, out, baseline=wanted, n_boot=n_boot, log=log)
    if len(tasks) > 1:
        raise BundleError("compare runs of the same task only: some are multi-label, some not")
    reference = _check_same_data(oofs)
    common = reference.aligned(sorted(reference.paths))  # every run's rows in this order
    views = [
        _view(name, d, oof.aligned(common.paths))
        for name, (d, oof) in zip(names, oofs, strict=True)
    ]
    base = _pick_baseline(views, baseline)
    y = common.labels
    groups = common.groups
    classes = reference.classes
    floor = _floor_view(base, y)

    def ci(values: np.ndarray, metric: Any) -> dict[str, float]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            v, lo, hi = bootstrap_ci(metric, values, y, groups=groups, n_boot=n_boot)
        return {"value": v, "low": lo, "high": hi}

    rows: list[dict[str, Any]] = []
    for v in [*views, floor]:
        log(f"compare: {v.name}")
        row: dict[str, Any] = {
            "name": v.name,
            "run": str(v.path) if v.path else None,
            "model": v.model,
            "params": v.params,
            "image_size": v.image_size,
            "auroc": ci(v.raw, FAST_METRICS["auroc"]),
            "accuracy": ci(v.decisions, _accuracy),
            "sensitivity": ci(v.decisions, _sensitivity(len(classes))),
            "specificity": ci(v.decisions, _specificity(len(classes))),
            "operating_point": v.threshold_rule,
            "calibration_method": v.calibration_method,
            "ece_before": ece(v.raw, y)[0],
            "ece_after": ece(v.calibrated, y)[0],
            "ece_adaptive_before": ece(v.raw, y, adaptive=True)[0],
            "ece_adaptive_after": ece(v.calibrated, y, adaptive=True)[0],
            "auroc_per_class": _per_class_auroc(v.raw, y, classes),
            "calibration_per_class": {
                c: {k: d[k] for k in ("ece", "intercept", "slope")}
                for c, d in per_class_calibration(v.calibrated, y, classes).items()
            },
            "train_seconds_per_image": v.metrics.get("train_seconds_per_image"),
            "inference_seconds_per_image": v.metrics.get("inference_seconds_per_image"),
            "wall_seconds": v.metrics.get("wall_seconds"),
            "device": v.metrics.get("device"),
        }
        if v is not floor:
            if v is not base:
                row["vs_baseline"] = _paired(v.raw, base.raw, y, groups, n_boot)
            if v.floor is not None:
                row["vs_floor"] = _paired(v.raw, v.floor, y, groups, n_boot)
        rows.append(row)

    report = {
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "classes": classes,
        "n_images": len(y),
        "n_patients": len(np.unique(groups)),
        "class_counts": {c: int(np.sum(y == i)) for i, c in enumerate(classes)},
        "baseline": base.name,
        "n_boot": n_boot,
        "rows": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    _plots(out, [*views, floor], y, classes)
    write_json_atomic(out / "report.json", json_safe(report))
    write_text_atomic(out / "report.md", render_markdown(report, [str(d) for d in run_dirs]))
    log(f"compare: {len(views)} runs + floor -> {out / 'report.md'}")
    return report


# -- loading ------------------------------------------------------------------------------------


def _unique_names(dirs: list[Path]) -> list[str]:
    names = [d.name for d in dirs]
    if len(set(names)) == len(names):
        return names
    return [f"{d.parent.name}/{d.name}" for d in dirs]


def _check_same_data(oofs: list[tuple[Path, OutOfFold]]) -> OutOfFold:
    first_dir, first = oofs[0]
    truth = dict(zip(first.paths, first.labels, strict=True))
    for d, oof in oofs[1:]:
        if oof.classes != first.classes:
            raise BundleError(
                f"{d}: classes {oof.classes} differ from {first_dir}'s {first.classes}; "
                "compare runs of the same task only"
            )
        other = dict(zip(oof.paths, oof.labels, strict=True))
        if other.keys() != truth.keys():
            n = len(other.keys() ^ truth.keys())
            raise BundleError(
                f"{d}: its out-of-fold images differ from {first_dir}'s ({n} not in both); "
                "runs must share a data set to be compared"
            )
        if any(other[p] != truth[p] for p in truth):
            raise BundleError(f"{d}: same images as {first_dir} but different labels")
    return first


def _view(name: str, run: Path, oof: OutOfFold) -> RunView:
    bundle = Bundle.read(run)
    metrics = bundle.metrics()
    cal = bundle.calibration() or {}
    entry = (cal.get("configurations") or {}).get(cal.get("default"), {})
    # The method the run's own calibration chose, applied to its fold models' OOF logits.
    method = entry.get("method")
    raw = softmax(oof.logits)
    calibrated = crossfit_probs(oof, method) if method else raw
    target = entry.get("threshold") or {}
    rule, decisions = _decisions(
        oof.logits, oof.labels, oof.folds, method, target.get("target"), target.get("value")
    )
    return RunView(
        name=name,
        path=run,
        model=bundle.model,
        image_size=bundle.image_size,
        params=_count_params(bundle.model, len(oof.classes), bundle.image_size),
        raw=raw,
        calibrated=calibrated,
        decisions=decisions,
        floor=oof.floor,
        folds=oof.folds,
        calibration_method=method,
        threshold_rule=rule,
        metrics=metrics,
    )


def _floor_view(base: RunView, y: np.ndarray) -> RunView:
    """The baseline run's floor (fitted on its folds), decided by the baseline's rule."""
    if base.floor is None:
        raise BundleError(f"{base.path}: no floor_prob_* columns in oof_predictions.csv")
    floor = base.floor
    n_classes = floor.shape[1]
    logits = np.log(np.clip(floor, 1e-12, 1.0))  # softmax(log p) == p
    target, value = _parse_rule(base.threshold_rule)
    rule, decisions = _decisions(logits, y, base.folds, None, target, value)
    return RunView(
        name=FLOOR,
        path=None,
        model="logistic regression",
        image_size=32,
        params=1025 if n_classes == 2 else 1025 * n_classes,
        raw=floor,
        calibrated=floor,
        decisions=decisions,
        floor=None,
        folds=base.folds,
        calibration_method=None,
        threshold_rule=rule,
        metrics={"train_seconds_per_image": None, "inference_seconds_per_image": None},
    )


def _pick_baseline(views: list[RunView], wanted: str | None) -> RunView:
    if wanted:
        for v in views:
            if wanted in (v.name, v.model, str(v.path)):
                return v
        raise BundleError(
            f"baseline {wanted!r} is none of the runs ({', '.join(v.name for v in views)})"
        )
    for v in views:
        if v.model.startswith("resnet50"):
            return v
    return views[0]


def _count_params(model: str, num_classes: int, image_size: int | None) -> int | None:
    """Parameter count of the run's architecture (random init: nothing is downloaded)."""
    from xraycls.models import create_model

    try:
        net = create_model(model, num_classes=num_classes, image_size=image_size or 224)
    except (ValueError, KeyError):
        return None
    return sum(p.numel() for p in net.parameters())


# -- decisions and paired statistics ----------------------------------------------------------


def _decisions(
    logits: np.ndarray,
    y: np.ndarray,
    folds: np.ndarray,
    method: str | None,
    target: str | None,
    value: float | None,
) -> tuple[str, np.ndarray]:
    """Cross-fitted decisions: binary at a threshold chosen without the scored fold."""
    if logits.shape[1] != 2 or not target:
        return "argmax", softmax(logits).argmax(1)
    decisions = np.zeros(len(y), np.int64)
    for k in np.unique(folds):
        held = folds == k
        if method:
            cal = fit_calibrator(method, logits[~held], y[~held])  # type: ignore[arg-type]
            fit_p, held_p = cal.predict_proba(logits[~held]), cal.predict_proba(logits[held])
        else:
            fit_p, held_p = softmax(logits[~held]), softmax(logits[held])
        t = threshold_for(fit_p[:, 1], y[~held], target=target, value=value)  # type: ignore[arg-type]
        decisions[held] = (held_p[:, 1] >= t).astype(np.int64)
    rule = f"{target} {value:g}" if value is not None else target
    return f"{rule} (cross-fitted threshold)", decisions


def _parse_rule(rule: str) -> tuple[str | None, float | None]:
    if rule == "argmax":
        return None, None
    parts = rule.split(" (")[0].split()
    return parts[0], (float(parts[1]) if len(parts) > 1 else None)


def _accuracy(d: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(d == y))


def _sensitivity(n_classes: int) -> Any:
    def metric(d: np.ndarray, y: np.ndarray) -> float:
        if n_classes == 2:
            return float(np.mean(d[y == 1] == 1)) if np.any(y == 1) else math.nan
        return float(
            np.nanmean([np.mean(d[y == c] == c) for c in range(n_classes) if np.any(y == c)])
        )

    return metric


def _specificity(n_classes: int) -> Any:
    def metric(d: np.ndarray, y: np.ndarray) -> float:
        if n_classes == 2:
            return float(np.mean(d[y == 0] == 0)) if np.any(y == 0) else math.nan
        return float(
            np.nanmean([np.mean(d[y != c] != c) for c in range(n_classes) if np.any(y != c)])
        )

    return metric


def _per_class_auroc(p: np.ndarray, y: np.ndarray, classes: list[str]) -> dict[str, float]:
    return dict(zip(classes, map(float, auroc_per_class(p, y)), strict=True))


def _paired(
    a: np.ndarray, b: np.ndarray, y: np.ndarray, groups: np.ndarray, n_boot: int
) -> dict[str, Any]:
    """AUROC(a) - AUROC(b): paired patient-level bootstrap interval and DeLong p-value(s)."""
    c = a.shape[1]
    auc = FAST_METRICS["auroc"]

    def diff(ab: np.ndarray, yy: np.ndarray) -> float:
        return auc(ab[:, :c], yy) - auc(ab[:, c:], yy)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d, lo, hi = bootstrap_ci(diff, np.hstack([a, b]), y, groups=groups, n_boot=n_boot)
    out: dict[str, Any] = {"diff": d, "low": lo, "high": hi}
    if c == 2:
        out["delong_p"] = delong_test(y, a[:, 1], b[:, 1])["p_value"]
    else:
        out["delong_p_per_class"] = {
            str(k): delong_test((y == k).astype(int), a[:, k], b[:, k])["p_value"] for k in range(c)
        }
    return out


# -- output -------------------------------------------------------------------------------------


def _plots(out: Path, views: list[RunView], y: np.ndarray, classes: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    shown = [len(classes) - 1] if len(classes) == 2 else list(range(len(classes)))
    fig, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 5), squeeze=False)
    for ax, k in zip(axes[0], shown, strict=True):
        for v in views:
            fpr, tpr, _ = roc_curve(y == k, v.raw[:, k])
            auc = auroc(v.raw[:, k], y == k)
            style = "k--" if v.name == FLOOR else "-"
            ax.plot(fpr, tpr, style, lw=1.5, label=f"{v.name} ({auc:.3f})")
        ax.plot([0, 1], [0, 1], ":", color="grey", lw=1)
        ax.set(
            xlabel="1 - specificity",
            ylabel="sensitivity",
            title=f"ROC, {classes[k]}" + (" vs rest" if len(classes) > 2 else ""),
        )
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    for ax, attr, title in (
        (axes[0], "raw", "uncalibrated"),
        (axes[1], "calibrated", "calibrated (cross-fitted)"),
    ):
        for v in views:
            p = getattr(v, attr)
            conf, acc = reliability_curve(p, y)
            style = "k--" if v.name == FLOOR else "-"
            ax.plot(conf, acc, style, marker="o", ms=3, label=f"{v.name} (ECE {ece(p, y)[0]:.3f})")
        ax.plot([0, 1], [0, 1], ":", color="grey", lw=1)
        ax.set(xlabel="confidence (top label)", ylabel="accuracy", title=f"Reliability, {title}")
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=100)
    plt.close(fig)


def _ci(m: dict[str, float] | None, digits: int = 3) -> str:
    if not m or m.get("value") is None or not math.isfinite(m["value"]):
        return "n/a"
    return f"{m['value']:.{digits}f} [{m['low']:.{digits}f}, {m['high']:.{digits}f}]"


def _delta(d: dict[str, Any] | None, classes: list[str]) -> str:
    if not d:
        return "—"
    text = f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
    if "delong_p" in d:
        p = _p(d["delong_p"])
        return f"{text}, p {p if p.startswith('<') else '= ' + p}"
    ps = d["delong_p_per_class"]
    return f"{text}; p {' / '.join(_p(ps[str(k)]) for k in range(len(classes)))}"


def _p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _num(v: Any, fmt: str) -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def _params(n: int | None) -> str:
    if n is None:
        return "—"
    return f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.0f} k"


def render_markdown(report: dict[str, Any], run_dirs: list[str]) -> str:
    """The report as Markdown: one table a paper can quote, then per-class AUROC and notes."""
    classes = report["classes"]
    binary = len(classes) == 2
    rows = report["rows"]
    counts = ", ".join(f"{c} {n}" for c, n in report["class_counts"].items())
    p_note = (
        "DeLong p (image level)"
        if binary
        else f"DeLong p per class ({' / '.join(classes)}, one-vs-rest, image level)"
    )
    lines = [
        f"# Backbone comparison: {' vs '.join(classes) if binary else ' / '.join(classes)}",
        "",
        f"{report['n_images']} images of {report['n_patients']} patients ({counts}); pooled "
        f"out-of-fold predictions of patient-grouped cross-validation. Baseline: "
        f"**{report['baseline']}**. 95% intervals: patient-level stratified bootstrap "
        f"({report['n_boot']} resamples); Δ columns are paired bootstrap intervals of the AUROC "
        f"difference with the {p_note}.",
        "",
        "| model | params | input | AUROC [95% CI] | Δ vs floor | Δ vs baseline | accuracy | "
        "sensitivity | specificity | ECE before → after | train s/img-epoch | inference ms/img |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        infer = r.get("inference_seconds_per_image")
        lines.append(
            "| "
            + " | ".join(
                [
                    f"**{r['name']}**" if r["name"] == report["baseline"] else r["name"],
                    _params(r["params"]),
                    f"{r['image_size']}²" if r["image_size"] else "—",
                    _ci(r["auroc"]),
                    _delta(r.get("vs_floor"), classes),
                    _delta(r.get("vs_baseline"), classes),
                    _ci(r["accuracy"]),
                    _ci(r["sensitivity"]),
                    _ci(r["specificity"]),
                    f"{r['ece_before']:.3f} → {r['ece_after']:.3f}"
                    if r["calibration_method"]
                    else f"{r['ece_before']:.3f} (own)",
                    _num(r.get("train_seconds_per_image"), ".4f"),
                    _num(None if infer is None else infer * 1000, ".2f"),
                ]
            )
            + " |"
        )
    op = rows[0]["operating_point"]
    rules = {
        r["name"]: f"{r['operating_point']}, {r['calibration_method'] or 'no'} calibration"
        for r in rows[:-1]
    }
    lines += [
        "",
        f"Accuracy, sensitivity, specificity: {'at the operating point `' + op + '`' if binary else 'at the argmax decision (sensitivity and specificity: macro averages over classes)'}"
        + (
            ": for each fold the threshold is chosen on the other folds' calibrated OOF "
            "probabilities, so these are the rates to expect on new data from the same source."
            if binary
            else "."
        ),
        "ECE: 15 equal-width bins on the top label; 'after' is the run's calibrator "
        f"(`{rows[0]['calibration_method']}`), cross-fitted by fold. Timings are per image on "
        f"the training device ({rows[0].get('device') or '?'}).",
        "",
    ]
    if len(set(rules.values())) > 1:
        lines += [
            "**The runs do not share one decision rule**, so their accuracy, sensitivity and "
            "specificity are not comparable: "
            + "; ".join(f"{name}: {rule}" for name, rule in rules.items())
            + ".",
            "",
        ]
    lines += [
        "## Calibration per class (cross-fitted by fold)",
        "",
        "Top-label ECE pools P = 0.15 for one class with P = 0.85 for the other, so opposite "
        "errors cancel. Per class: the ECE of P(class) against its observed rate, and the "
        "calibration intercept (0 = right on average; > 0 = under-predicts) and slope (1 = right "
        "spread; < 1 = too extreme).",
        "",
        "| model | " + " | ".join(f"{c}: ECE / intercept / slope" for c in classes) + " |",
        "|---|" + "---|" * len(classes),
    ]
    for r in rows:
        per = r["calibration_per_class"]
        cells = [
            f"{per[c]['ece']:.3f} / {per[c]['intercept']:+.2f} / {per[c]['slope']:.2f}"
            for c in classes
        ]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    lines.append("")
    if not binary:
        lines += [
            "## AUROC per class (one-vs-rest, OOF)",
            "",
            "| model | " + " | ".join(classes) + " |",
            "|---|" + "---|" * len(classes),
        ]
        for r in rows:
            per = r["auroc_per_class"]
            lines.append(f"| {r['name']} | " + " | ".join(f"{per[c]:.3f}" for c in classes) + " |")
        lines.append("")
    n_tests = sum(bool(r.get("vs_floor")) + bool(r.get("vs_baseline")) for r in rows)
    lines += [
        "## Reading this table",
        "",
        "- **The floor** is a logistic regression on 32x32 downsampled pixels, fitted on the same "
        "folds. On the Kermany pediatric set it is strong because of acquisition shortcuts; a "
        "backbone is only interesting by what it adds over it (Δ vs floor, against the floor "
        "fitted on that run's own folds; the floor row is the baseline's).",
        f"- {n_tests} comparisons are shown"
        + ("" if binary else f" ({n_tests * len(classes)} per-class DeLong tests)")
        + ", without correction for multiple testing; p-values are image-level DeLong tests, "
        "the intervals are patient-level.",
        "- Runs that differ in more than the backbone (epochs, image size, pretraining) are "
        "compared as whole recipes, not as architectures.",
        "",
        "![ROC](roc.png)",
        "",
        "![Reliability](reliability.png)",
        "",
        "Runs:",
        "",
        *[f"- `{d}`" for d in run_dirs],
        "",
        f"Generated {report['generated']} by `xraycls compare`.",
        "",
    ]
    return "\n".join(lines)
