"""Exports of the viewer's results: the JSON report of one image, the batch table and its CSV."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from xraycls import __version__
from xraycls.bundle.card import INTENDED_USE
from xraycls.bundle.summary import RunSummary, ServedSummary, threshold_info
from xraycls.inference.analysis import (
    Analysis,
    UploadFailure,
    decision_text,
    uncertainty_text,
)
from xraycls.io.files import json_safe

if TYPE_CHECKING:
    from xraycls.inference.predictor import Predictor


def build_report(
    analysis: Analysis,
    summary: RunSummary,
    predictor: Predictor,
    *,
    explanation: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The JSON report of one image: prediction, the served model and its validation, checks.

    Every probability and threshold belongs to the served configuration under the chosen
    calibration (``predictor``), and its quality figures were measured on patients none of its
    models saw. No patient identifiers: the image is identified by its upload name and SHA-256.
    """
    pred = analysis.prediction
    classes = list(summary.classes)
    meta = analysis.raw.meta
    entry = predictor.calibration_entry
    info = threshold_info(entry)
    served = ServedSummary.from_entry(entry, predictor.calibration_name) if entry else None
    return json_safe(
        {
            "intended_use": INTENDED_USE,
            "generated_utc": (now or datetime.now(UTC)).isoformat(timespec="seconds"),
            "xraycls_version": __version__,
            "image": {
                "file": analysis.name,
                "sha256": analysis.sha256,
                "format": meta.format,
                "original_shape": list(meta.original_shape),
                "modality": meta.modality,
                "body_part": meta.body_part,
                "view_position": meta.view_position,
                "photometric": meta.photometric,
            },
            "model": {
                "run": summary.name,
                "backbone": summary.backbone,
                "image_size": summary.image_size,
                "training_data": summary.data,
                "served": predictor.configuration,
                "n_members": predictor.n_members,
                "backend": predictor.backend,
                "cross_validation_auroc": summary.cv_auroc,
                "cross_validation_auroc_95ci": list(summary.cv_auroc_ci)
                if summary.cv_auroc_ci
                else None,
            },
            "calibration": {
                "name": predictor.calibration_name,
                "calibrated": predictor.calibrated,
                "method": served.method if served else None,
                "validated_on": f"{served.n_images} {served.source} images" if served else None,
                "auroc": served.auroc if served else None,
                "ece": served.ece if served else None,
                "ece_uncalibrated": served.ece_uncalibrated if served else None,
                "threshold": asdict(info) if info else None,
                "validation": "cross-fitted: scored by calibrators and thresholds fitted on "
                "other patients"
                if served
                else "none: uncalibrated probabilities",
            },
            "prediction": {
                "decision": pred.predicted,
                "decision_text": decision_text(pred, classes, info),
                "probabilities": {c: float(pred.probs[i]) for i, c in enumerate(classes)},
                "uncalibrated_probabilities": {
                    c: float(pred.raw_probs[i]) for i, c in enumerate(classes)
                },
                "member_probabilities": np.atleast_2d(pred.member_probs).tolist(),
                "findings": [
                    {
                        "finding": c,
                        "probability": float(pred.probs[i]),
                        "present": bool(pred.decisions[i]),
                        "threshold": float(pred.thresholds[i]),
                    }
                    for i, c in enumerate(classes)
                ]
                if pred.decisions is not None and pred.thresholds is not None
                else None,
                "uncertainty": uncertainty_text(pred, classes),
            },
            "out_of_distribution": {
                "flagged": analysis.ood.flagged,
                "warnings": analysis.ood.warnings(),
                "notes": analysis.ood.notes,
                "intensity": asdict(analysis.ood.intensity) if analysis.ood.intensity else None,
            },
            "explanation": explanation,
        }
    )


def batch_row(item: Analysis | UploadFailure, classes: Sequence[str]) -> dict[str, Any]:
    """One row of the batch table."""
    if isinstance(item, UploadFailure):
        row: dict[str, Any] = {"file": item.name, "status": "error", "decision": ""}
        row |= {f"P({c})": None for c in classes}
        return row | {"spread": "", "out_of_distribution": "", "message": item.message}
    pred = item.prediction
    m = np.atleast_2d(pred.member_probs)
    k = 1 if len(classes) == 2 else int(np.argmax(pred.probs))
    row = {"file": item.name, "status": "ok", "decision": pred.predicted}
    row |= {f"P({c})": round(float(pred.probs[i]), 4) for i, c in enumerate(classes)}
    spread = f"{m[:, k].min():.3f}-{m[:, k].max():.3f}" if m.shape[0] > 1 else "single model"
    return row | {
        "spread": spread,
        "out_of_distribution": "yes" if item.ood.flagged else "no",
        "message": " ".join(item.ood.warnings()),
    }


def rows_to_csv(rows: Sequence[dict[str, Any]]) -> str:
    """CSV text of table rows (columns from the first row)."""
    if not rows:
        return ""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()
