"""Site adaptation: a hospital refits the served model's calibration and operating threshold on
its own labelled images, into a new, named calibration inside the bundle.

Thresholds chosen on one population do not transfer to another: prevalence, devices and
protocols move the probabilities. ``xraycls calibrate RUN --on SITE.csv --name SITE`` scores the
site's images with the served configuration (uncalibrated logits), fits a calibrator and an
operating threshold on them and validates both there by cross-fitting, exactly as the bundle's
own calibration was fitted on its holdout (:func:`xraycls.bundle.calibration.fit_configuration`).
The result goes to ``calibrations/<SITE>.json``; the bundle's own calibration is never touched,
and ``predict``/``evaluate``/the viewer use the site's with ``--calibration SITE``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from xraycls.bundle.calibration import (
    MethodChoice,
    ThresholdTarget,
    fit_configuration,
    save_calibration_file,
    served_line,
    site_calibration_path,
)
from xraycls.bundle.card import write_model_card
from xraycls.bundle.format import Bundle, BundleError, Members, ServedPredictions
from xraycls.inference.predictor import Predictor
from xraycls.inference.rows import load_item
from xraycls.io.manifest import read_labels


def calibrate_site(
    run_dir: str | Path,
    data: str | Path,
    name: str,
    *,
    members: Members = "auto",
    label_column: str | None = None,
    method: MethodChoice = "auto",
    threshold_target: ThresholdTarget = "sensitivity",
    threshold_value: float | None = 0.95,
    batch_size: int = 16,
    device: str = "auto",
    n_boot: int = 1000,
    replace: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Fit and validate a site calibration of the served configuration on ``data``.

    Returns:
        The stored entry (see :func:`~xraycls.bundle.calibration.fit_configuration`).

    Raises:
        BundleError: A bad name, an existing calibration of that name (without ``replace``),
            too few labelled images of a class to cross-fit, or an unusable bundle.
        ValueError: The labels CSV lacks the label column or holds other classes.
    """
    bundle = Bundle.read(run_dir)
    if bundle.multilabel:
        raise BundleError(
            f"{bundle.path}: a multi-label bundle; `xraycls calibrate --on` on an external labelled set "
            "handles one label per image only so far (the bundle's own per-finding validation is "
            "in MODEL_CARD.md and calibration.json)"
        )
    target = site_calibration_path(bundle, name)
    if target.exists() and not replace:
        raise BundleError(f"{target}: a site calibration {name!r} exists; choose another name")
    predictor = Predictor.from_run(bundle, members=members, device=device)
    pred = _site_logits(predictor, data, label_column or bundle.label_column, batch_size)
    pred.source = f"{name} labelled set"
    log(f"{name}: {len(pred.labels)} readable labelled images of {len(set(pred.groups))} patients")
    entry = fit_configuration(
        pred,
        predictor.configuration,
        method=method,
        threshold_target=threshold_target,
        threshold_value=threshold_value,
        n_boot=n_boot,
    )
    save_calibration_file(
        target,
        {predictor.configuration: entry},
        default=predictor.configuration,
        name=name,
        labels=str(Path(data).resolve()),
    )
    write_model_card(bundle.path, n_boot=n_boot)
    log(served_line(predictor.configuration, entry))
    return entry


def _site_logits(
    predictor: Predictor, data: str | Path, column: str, batch_size: int
) -> ServedPredictions:
    """The served configuration's uncalibrated logits on the site's readable labelled images."""
    rows = [r for r in read_labels(data) if r.get("status", "ok") == "ok" and r.get(column)]
    if not rows:
        raise ValueError(f"{data}: no labelled rows in column {column!r} (--label-column)")
    unknown = sorted({r[column] for r in rows} - set(predictor.classes))
    if unknown:
        raise ValueError(f"{data}: labels {unknown} are not classes of the run {predictor.classes}")
    kept, logits = [], []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        items = [load_item(r["path"], predictor.prep) for r in chunk]
        ok = [(r, it) for r, it in zip(chunk, items, strict=True) if it["pixels"] is not None]
        if ok:
            batch = predictor.to_tensor([np.asarray(it["pixels"]) for _, it in ok])
            logits.append(predictor.logits(batch).mean(0))
            kept += [r for r, _ in ok]
    if not kept:
        raise ValueError(f"{data}: no readable labelled images")
    return ServedPredictions(
        paths=[r["path"] for r in kept],
        groups=np.array([r.get("patient_id") or r["path"] for r in kept]),
        labels=np.array([predictor.classes.index(r[column]) for r in kept]),
        classes=list(predictor.classes),
        logits={predictor.configuration: np.concatenate(logits)},
    )
