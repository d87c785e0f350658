"""``MODEL_CARD.md`` for a run bundle, generated from the bundle's own files.

Two kinds of numbers, labelled for what they are:

- **Cross-validation** (the fold models, each on the patients it did not train on): how well the
  recipe discriminates, beside the 32x32 logistic-regression floor on the same folds (DeLong).
- **The served model** (fold ensemble, refit model), on the calibration holdout that none of
  its models saw: discrimination, calibration per class and the operating point, each
  cross-fitted (see :mod:`xraycls.bundle.calibration`) with patient-level intervals. Site
  calibrations and external evaluations (``xraycls evaluate``) are listed when present.
"""

from __future__ import annotations

import json
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from xraycls.bundle.format import CARD_FILE, METRICS_FILE, OOF_FILE, Bundle, BundleError
from xraycls.evaluation.metrics import FAST_METRICS, bootstrap_ci, delong_test, softmax
from xraycls.io.files import write_json_atomic, write_text_atomic

INTENDED_USE = (
    "Research use only. Not a medical device: not for diagnosis, triage or patient management; "
    "every output must be reviewed by a qualified reader."
)
_NAMES = {"folds": "fold ensemble", "refit": "refit model"}


def _num(value: float | None, digits: int = 3) -> str:
    """A metric for the card; undefined ones (e.g. PPV with no positive calls) read "n/a"."""
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _ci(d: dict[str, float] | None, digits: int = 3) -> str:
    if not d or d.get("value") is None or not np.isfinite(d["value"]):
        return "n/a"
    return f"{d['value']:.{digits}f} [{_num(d.get('low'), digits)}, {_num(d.get('high'), digits)}]"


def write_model_card(run_dir: str | Path, *, n_boot: int = 1000) -> Path:
    """Write ``RUN_DIR/MODEL_CARD.md`` and return its path.

    The cross-validation intervals are also stored, as numbers, in ``metrics.json`` under
    ``pooled_oof_ci`` and ``floor_ci`` (what the viewer and reports read).
    """
    bundle = Bundle.read(run_dir)
    metrics = bundle.metrics()
    oof = bundle.oof()
    if oof.floor is None:
        raise BundleError(f"{bundle.path / OOF_FILE}: no floor_prob_* columns")
    if bundle.multilabel:
        cv_lines, intervals = _cross_validation_findings(metrics)
    else:
        cv_lines, intervals = _cross_validation(bundle, metrics, oof, n_boot)
    lines = [
        f"# Model card: {bundle.model} ({bundle.path.name})",
        "",
        f"Generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by xraycls {bundle.xraycls_version} "
        "from the files of this bundle.",
        "",
        *_intended_use(bundle, metrics, oof),
        *_model(bundle),
        *_distillation(metrics),
        *cv_lines,
        *_served(bundle),
        *_site_calibrations(bundle),
        *_external(bundle),
        "## Training configuration",
        "",
        "```yaml",
        bundle.config_yaml().rstrip(),
        "```",
        "",
        f"Device {metrics.get('device')}, precision {metrics.get('amp')}; "
        f"{_num(metrics.get('train_seconds_per_image'), 4)} s per training image-epoch, "
        f"{_num(metrics.get('inference_seconds_per_image'), 4)} s per image at inference.",
        "",
    ]
    path = bundle.path / CARD_FILE
    write_text_atomic(path, "\n".join(lines))
    metrics_path = bundle.path / METRICS_FILE
    stored = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    write_json_atomic(metrics_path, stored | intervals)
    return path


def _intended_use(bundle: Bundle, metrics: dict[str, Any], oof: Any) -> list[str]:
    n_hold = metrics.get("n_holdout_images", 0)
    return [
        "## Intended use, data and limitations",
        "",
        f"- **{INTENDED_USE}**",
        f"- Trained on `{bundle.training_data()}`: {len(oof.labels)} images of "
        f"{len(np.unique(oof.groups))} patients in patient-grouped cross-validation, plus "
        f"{n_hold} images held out (never trained on) to calibrate the served model.",
        "- Performance on other populations, devices, views or sites is unknown until measured "
        "(`xraycls evaluate`); thresholds do not transfer between hospitals without checking "
        "(`xraycls calibrate RUN --on SITE.csv --name SITE`).",
        "- If the data is the Kermany pediatric pneumonia set: children aged 1-5, AP views, one "
        "hospital; the set has acquisition shortcuts (a logistic regression on 32x32 pixels is "
        "already strong, see below). Do not expect these numbers on adult or external data.",
        "",
    ]


def _model(bundle: Bundle) -> list[str]:
    counts = ", ".join(bundle.classes)
    return [
        "## Model",
        "",
        f"- Backbone `{bundle.model}`, input {bundle.image_size}x{bundle.image_size} "
        f"({bundle.preprocessing.resize}, window `{bundle.preprocessing.window}`), "
        f"normalisation mean {list(bundle.normalization[0])} / std {list(bundle.normalization[1])}.",
        f"- Served by default: the **{_NAMES.get(bundle.default_members(), '?')}** "
        f"({len(bundle.fold_weights)} fold models, mean logits)"
        + (
            "; the refit model (`weights.safetensors`) on request (`--members refit`)."
            if bundle.refit_weights
            else "."
        ),
        (
            f"- Multi-label: {len(bundle.classes)} findings, one sigmoid each (any number may be "
            f"present): {counts}."
            if bundle.multilabel
            else f"- Classes: {counts}."
        ),
        "",
    ]


def _distillation(metrics: dict[str, Any]) -> list[str]:
    d = metrics.get("distillation")
    if not d:
        return []
    honest = (
        "each fold's student learned only from the teacher's model of the same fold (which never "
        "saw that fold's patients), so the out-of-fold figures below are honest"
        if d.get("out_of_fold_honest")
        else "every student learned from the teacher's whole fold ensemble, which saw the "
        "held-out folds: **the out-of-fold figures below are optimistic**"
    )
    return [
        "## Distillation",
        "",
        f"- Student of `{d.get('teacher_model')}` at {d.get('teacher_image_size')} px "
        f"(teacher run `{d.get('teacher')}`, id `{d.get('teacher_id')}`, pooled OOF AUROC "
        f"{_num(d.get('teacher_pooled_oof_auroc'))}).",
        f"- Loss: alpha={d.get('alpha')} x T^2 x KL(teacher || student) at T={d.get('temperature')}"
        f" + (1 - alpha) x cross-entropy on the labels; {honest}.",
        "",
    ]


def _cross_validation(
    bundle: Bundle, metrics: dict[str, Any], oof: Any, n_boot: int
) -> tuple[list[str], dict[str, Any]]:
    probs, floor = softmax(oof.logits), oof.floor
    intervals: dict[str, dict[str, dict[str, float]]] = {"pooled_oof_ci": {}, "floor_ci": {}}

    def ci(p: np.ndarray, name: str, key: str) -> str:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            v, lo, hi = bootstrap_ci(
                FAST_METRICS[name], p, oof.labels, groups=oof.groups, n_boot=n_boot
            )
        intervals[key][name] = {"value": v, "low": lo, "high": hi, "n_boot": n_boot}
        return f"{v:.3f} [{lo:.3f}, {hi:.3f}]"

    names = ("auroc", "accuracy", "sensitivity", "specificity", "balanced_accuracy")
    model_row = " | ".join(ci(probs, n, "pooled_oof_ci") for n in names)
    floor_row = " | ".join(ci(floor, n, "floor_ci") for n in names)
    lines = [
        "## Cross-validation (fold models, out of fold)",
        "",
        f"{len(metrics.get('folds', []))}-fold `StratifiedGroupKFold` by patient on the "
        "development data; early stopping and checkpoint choice used an inner patient-grouped "
        "split of each training fold only. Each image is scored by the fold model that did not "
        "train on it, uncalibrated, decided by argmax. These numbers describe the recipe; the "
        f"served model is below. 95% intervals: patient-level stratified bootstrap ({n_boot}).",
        "",
        "| | AUROC | accuracy | sensitivity | specificity | balanced accuracy |",
        "|---|---|---|---|---|---|",
        f"| fold models | {model_row} |",
        f"| floor: logistic regression on 32x32 pixels | {floor_row} |",
        "",
    ]
    if len(oof.classes) == 2:
        d = delong_test(oof.labels, probs[:, 1], floor[:, 1])
        lines += [
            f"Model minus floor, AUROC: {d['diff']:+.3f} (95% CI {d['ci_low']:+.3f} to "
            f"{d['ci_high']:+.3f}), DeLong p = {d['p_value']:.3g} (image level).",
            "",
        ]
    else:
        for c, name in enumerate(oof.classes):
            d = delong_test((oof.labels == c).astype(int), probs[:, c], floor[:, c])
            lines.append(
                f"- {name} vs rest, model minus floor AUROC {d['diff']:+.3f} "
                f"({d['ci_low']:+.3f} to {d['ci_high']:+.3f}), DeLong p = {d['p_value']:.3g}"
            )
        lines.append("")
    return lines, intervals


def _cross_validation_findings(metrics: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """The multi-label cross-validation table, per finding, from ``metrics.json``."""
    pooled, floor = metrics["pooled_oof"], metrics["floor_logreg_32px"]
    lo, hi = pooled.get("auroc_ci", [float("nan")] * 2)
    intervals = {"pooled_oof_ci": {"auroc": {"value": pooled["auroc"], "low": lo, "high": hi}}}
    lines = [
        "## Cross-validation (fold models, out of fold)",
        "",
        f"{len(metrics.get('folds', []))}-fold patient-grouped cross-validation, stratified by "
        "finding (iterative stratification over patients), on the development data. Each image "
        "is scored by the fold model that did not train on it (uncalibrated sigmoid); labels "
        f"marked unknown are left out of a finding's numbers (policy `{metrics.get('uncertain')}`)."
        " The floor is one logistic regression per finding on 32x32 pixels, same folds. 95% "
        "intervals: patient-level bootstrap; model vs floor: paired DeLong (image level).",
        "",
        f"Macro AUROC {_num(pooled['auroc'])} [{_num(lo)}, {_num(hi)}] (floor "
        f"{_num(floor['auroc'])}); micro AUROC {_num(pooled['auroc_micro'])} (floor "
        f"{_num(floor['auroc_micro'])}); macro AUPRC {_num(pooled['auprc'])} (floor "
        f"{_num(floor['auprc'])}); macro ECE {_num(pooled['ece'])}.",
        "",
        "| finding | positives / known | AUROC [95% CI] | floor AUROC | model - floor (p) | "
        "AUPRC | floor AUPRC | ECE |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f, m in pooled["per_finding"].items():
        fl = floor["per_finding"][f]
        ci = m.get("auroc_ci", [float("nan")] * 2)
        vs = m.get("vs_floor", {})
        lines.append(
            f"| {f} | {int(m['positives'])} / {int(m['n'])} | {_num(m['auroc'])} "
            f"[{_num(ci[0])}, {_num(ci[1])}] | {_num(fl['auroc'])} | "
            f"{_num(vs.get('diff'))} ({_num(vs.get('p_value'), 3)}) | {_num(m['auprc'])} | "
            f"{_num(fl['auprc'])} | {_num(m['ece'])} |"
        )
    return [*lines, ""], intervals


def _served(bundle: Bundle) -> list[str]:
    data = bundle.calibration() if bundle.file("calibration.json").exists() else None
    if not data:
        return [
            "## The served model",
            "",
            "**Uncalibrated.** This bundle has no calibration holdout (`cv.calibration_holdout: "
            "0`): its probabilities are raw softmax outputs, no operating threshold is stored, "
            "and no number here describes the served model on data it never saw.",
            "",
        ]
    lines = ["## The served model, on patients none of its models saw", ""]
    for name, entry in data["configurations"].items():
        lines += configuration_section(name, entry, default=name == data.get("default"))
    return lines


def configuration_section(name: str, entry: dict[str, Any], *, default: bool) -> list[str]:
    """The card's section for one calibrated configuration (bundle or site calibration)."""
    if entry.get("task") == "multilabel":
        return findings_section(name, entry, default=default)
    v, d = entry["validation"], entry["data"]
    title = _NAMES.get(name, name) + (" (served by default)" if default else "")
    sel = ", ".join(f"{m} {s:.4f}" for m, s in entry["selection"]["candidates"].items())
    lines = [
        f"### {title}",
        "",
        f"Calibration data: {d['n_images']} images of {d['n_patients']} patients "
        f"({d['source']}; {', '.join(f'{c} {n}' for c, n in d['class_counts'].items())}). "
        f"Validation: {v['protocol']}.",
        "",
        f"- Discrimination: AUROC {_ci(v['auroc'])}.",
        f"- Calibrator: `{entry['method']}`, chosen by {entry['selection']['criterion']} ({sel}).",
        f"- Top-label ECE {_ci(v['ece_uncalibrated'])} uncalibrated -> {_ci(v['ece'])} "
        f"calibrated; Brier {_ci(v['brier'])}; NLL {_ci(v['nll'])}. ECE intervals are basic "
        "bootstrap intervals: resampling inflates a binned ECE, the basic interval corrects "
        "for it, so it can lie below the plug-in estimate.",
        "",
        "| class | P(class) ECE | calibration intercept | calibration slope | observed rate | "
        "mean predicted |",
        "|---|---|---|---|---|---|",
    ]
    for c, pc in v["per_class"].items():
        lines.append(
            f"| {c} | {_ci(pc['ece'])} | {_num(pc['intercept'], 2)} | {_num(pc['slope'], 2)} | "
            f"{_num(pc['observed_rate'])} | {_num(pc['mean_predicted'])} |"
        )
    lines.append("")
    t = entry.get("threshold")
    if t:
        at = v["at_threshold"]
        target = "Youden" if t["target"] == "youden" else f"{t['value']:.0%} {t['target']}"
        lines += [
            f"- Operating threshold {t['threshold']:.4f} on P({t['positive']}) (target: "
            f"{target}). Cross-fitted (each part thresholded by a threshold chosen on the "
            f"others): sensitivity {_ci(at['sensitivity'])}, specificity "
            f"{_ci(at['specificity'])}, PPV {_num(at['ppv'])}, NPV {_num(at['npv'])}.",
            "",
        ]
    return lines


def findings_section(name: str, entry: dict[str, Any], *, default: bool) -> list[str]:
    """A multi-label configuration: per finding, its calibrator, operating threshold and their
    cross-fitted validation on the calibration data."""
    d, macro = entry["data"], entry["validation"]["macro"]
    title = _NAMES.get(name, name) + (" (served by default)" if default else "")
    first = next(iter(entry["findings"].values()))
    lines = [
        f"### {title}",
        "",
        f"Calibration data: {d['n_images']} images of {d['n_patients']} patients "
        f"({d['source']}). Each finding is calibrated on its own sigmoid (temperature or Platt, "
        "chosen by cross-fitted NLL) and given its own operating threshold; "
        f"validation: {first['validation']['protocol']}.",
        "",
        f"Macro over findings: AUROC {_num(macro['auroc'])}, ECE {_num(macro['ece_uncalibrated'])}"
        f" uncalibrated -> {_num(macro['ece'])} calibrated, Brier {_num(macro['brier'])}.",
        "",
        "| finding | positives | AUROC | calibrator | P(finding) ECE | threshold | sensitivity "
        "| specificity |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f, e in entry["findings"].items():
        v, t = e["validation"], e.get("threshold") or {}
        at = v.get("at_threshold") or {}
        lines.append(
            f"| {f} | {e['data']['class_counts'].get(f, '?')} | {_ci(v['auroc'])} | "
            f"{e['method']} | {_ci(v['per_class'][f]['ece'])} | {_num(t.get('threshold'), 4)} | "
            f"{_ci(at.get('sensitivity'))} | {_ci(at.get('specificity'))} |"
        )
    t = first.get("threshold") or {}
    if t:
        target = "Youden" if t["target"] == "youden" else f"{t['value']:.0%} {t['target']}"
        lines += [
            "",
            f"Thresholds target {target} per finding; sensitivity and specificity are "
            "cross-fitted (each part thresholded by a threshold chosen on the others).",
        ]
    return [*lines, ""]


def _site_calibrations(bundle: Bundle) -> list[str]:
    names = bundle.site_calibrations()
    if not names:
        return []
    lines = [
        "## Site calibrations",
        "",
        "Refitted on a site's own labelled images (`xraycls calibrate RUN --on CSV --name SITE`);"
        " choose one with `--calibration SITE`. The bundle's own calibration is unchanged.",
        "",
    ]
    for site in names:
        data = bundle.calibration(site)
        assert data is not None
        lines += [f"### {site} (`{data.get('labels', '?')}`)", ""]
        for name, entry in data["configurations"].items():
            lines += configuration_section(name, entry, default=False)
    return lines


def _external(bundle: Bundle) -> list[str]:
    reports = sorted(bundle.path.glob("eval-*/metrics.json"))
    if not reports:
        return []
    lines = [
        "## External evaluations (`xraycls evaluate`)",
        "",
        "| data | images | AUROC | calibration intercept / slope | at the stored threshold |",
        "|---|---|---|---|---|",
    ]
    for path in reports:
        try:
            r = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        cal = r.get("calibration", {})
        at = r.get("at_threshold") or {}
        lines.append(
            f"| `{r.get('data', '?')}` | {r.get('n_images', '?')} | "
            f"{_ci(r.get('calibrated', {}).get('auroc'))} | "
            f"{_num(cal.get('intercept'), 2)} / {_num(cal.get('slope'), 2)} | "
            + (
                f"sensitivity {_ci(at.get('sensitivity'))}, specificity {_ci(at.get('specificity'))}"
                if at
                else "n/a"
            )
            + " |"
        )
    return [*lines, ""]
