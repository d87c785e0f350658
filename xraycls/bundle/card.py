"""``MODEL_CARD.md`` for a run bundle, generated from the bundle's own files.

Headline numbers carry 95% intervals from a patient-level stratified bootstrap of the pooled
out-of-fold predictions, and binary runs are compared with the 32x32 logistic-regression floor
on the same folds (DeLong test), so a reader sees what the model adds over a trivial baseline.
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


def _num(value: float | None, digits: int = 3) -> str:
    """A metric for the card; undefined ones (e.g. PPV with no positive calls) read "n/a"."""
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def write_model_card(run_dir: str | Path, *, n_boot: int = 1000) -> Path:
    """Write ``RUN_DIR/MODEL_CARD.md`` and return its path.

    The headline intervals are also stored, as numbers, in ``metrics.json`` under
    ``pooled_oof_ci`` and ``floor_ci`` (what the viewer and reports read).
    """
    bundle = Bundle.read(run_dir)
    run = bundle.path
    config = bundle.config_yaml()
    metrics = bundle.metrics()
    oof = bundle.oof()
    probs = softmax(oof.logits)
    if oof.floor is None:
        raise BundleError(f"{run / OOF_FILE}: no floor_prob_* columns")
    floor = oof.floor
    classes = oof.classes
    intervals: dict[str, dict[str, dict[str, float]]] = {"pooled_oof_ci": {}, "floor_ci": {}}

    def ci(p: np.ndarray, name: str) -> str:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            v, lo, hi = bootstrap_ci(
                FAST_METRICS[name], p, oof.labels, groups=oof.groups, n_boot=n_boot
            )
        key = "floor_ci" if p is floor else "pooled_oof_ci"
        intervals[key][name] = {"value": v, "low": lo, "high": hi, "n_boot": n_boot}
        return f"{v:.3f} [{lo:.3f}, {hi:.3f}]"

    counts = {c: int(np.sum(oof.labels == i)) for i, c in enumerate(classes)}
    cal = metrics.get("calibration")
    lines = [
        f"# Model card: {bundle.model} ({run.name})",
        "",
        f"Generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by xraycls {bundle.xraycls_version} from the files of this bundle.",
        "",
        "## Intended use and limitations",
        "",
        "- **Research use only. Not a medical device**; not for diagnosis or patient management.",
        f"- Trained and cross-validated on `{bundle.training_data()}`: {len(oof.labels)} images of "
        f"{len(np.unique(oof.groups))} patients. Performance on other populations, devices or "
        "views is unknown until measured (`xraycls evaluate`).",
        "- If the data is the Kermany pediatric pneumonia set: children aged 1-5, AP views, one "
        "hospital; the set has acquisition shortcuts (a logistic regression on 32x32 pixels is "
        "already strong, see below). Do not expect these numbers on adult or external data.",
        "",
        "## Model",
        "",
        f"- Backbone `{bundle.model}`, input {bundle.image_size}x{bundle.image_size} "
        f"({bundle.preprocessing.resize}, window `{bundle.preprocessing.window}`), "
        f"normalisation mean {list(bundle.normalization[0])} / std {list(bundle.normalization[1])}.",
        f"- Weights: {'`weights.safetensors` (refit on all data) and ' if bundle.refit_weights else ''}"
        f"{len(bundle.fold_weights)} fold models (`fold*/weights.safetensors`).",
        f"- Classes: {', '.join(f'{c} ({counts[c]})' for c in classes)}.",
        "",
        "## Evaluation (pooled out-of-fold, patient-grouped CV)",
        "",
        f"{len(metrics['folds'])}-fold `StratifiedGroupKFold` by patient; early stopping and checkpoint choice used an inner "
        "patient-grouped split of each training fold only. 95% intervals: patient-level stratified bootstrap "
        f"({n_boot} resamples).",
        "",
        "| | AUROC | accuracy | sensitivity | specificity | balanced accuracy |",
        "|---|---|---|---|---|---|",
        f"| model | {ci(probs, 'auroc')} | {ci(probs, 'accuracy')} | {ci(probs, 'sensitivity')} | {ci(probs, 'specificity')} | {ci(probs, 'balanced_accuracy')} |",
        f"| floor: logistic regression on 32x32 pixels | {ci(floor, 'auroc')} | {ci(floor, 'accuracy')} | {ci(floor, 'sensitivity')} | {ci(floor, 'specificity')} | {ci(floor, 'balanced_accuracy')} |",
        "",
    ]
    if len(classes) == 2:
        d = delong_test(oof.labels, probs[:, 1], floor[:, 1])
        lines += [
            f"Model minus floor, AUROC: {d['diff']:+.3f} (95% CI {d['ci_low']:+.3f} to {d['ci_high']:+.3f}), "
            f"DeLong p = {d['p_value']:.3g} (image level).",
            "",
        ]
    if cal:
        lines += [
            "## Calibration",
            "",
            f"- `{cal['method']}` fitted on the pooled out-of-fold logits (`calibration.json`), applied by every consumer.",
            f"- ECE (15 bins): {cal['before']['ece']:.4f} uncalibrated -> {cal['after_crossfit']['ece']:.4f} "
            "calibrated (cross-fitted: each fold scored by a calibrator fitted on the other folds).",
        ]
        if "threshold" in cal:
            t = cal["threshold"]
            at = t["oof_at_threshold"]
            lines.append(
                f"- Operating threshold {t['threshold']:.4f} on P({t['positive']}) for target {t['target']} "
                f"{t['value']}: OOF sensitivity {_num(at['sensitivity'])}, "
                f"specificity {_num(at['specificity'])}, PPV {_num(at['ppv'])}, NPV {_num(at['npv'])}."
            )
        lines.append("")
    lines += [
        "## Training configuration",
        "",
        "```yaml",
        config.rstrip(),
        "```",
        "",
        f"Device {metrics.get('device')}, precision {metrics.get('amp')}; "
        f"{metrics.get('train_seconds_per_image', float('nan')):.4f} s per training image-epoch, "
        f"{metrics.get('inference_seconds_per_image', float('nan')):.4f} s per image at inference.",
        "",
    ]
    path = run / CARD_FILE
    write_text_atomic(path, "\n".join(lines))
    _store_intervals(run, intervals)
    return path


def _store_intervals(run: Path, intervals: dict[str, Any]) -> None:
    path = run / METRICS_FILE
    metrics = json.loads(path.read_text()) if path.exists() else {}
    write_json_atomic(path, metrics | intervals)
