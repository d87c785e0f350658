"""Exports of the viewer's results: the JSON report of one image, the batch table and its CSV."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

import numpy as np

from xraycls import __version__
from xraycls.bundle.summary import RunSummary
from xraycls.inference.analysis import (
    Analysis,
    UploadFailure,
    decision_text,
    uncertainty_text,
)
from xraycls.io.files import json_safe

INTENDED_USE = (
    "Research use only. Not a medical device: not for diagnosis, triage or patient management; "
    "every output must be reviewed by a qualified reader."
)


def build_report(
    analysis: Analysis,
    summary: RunSummary,
    *,
    members: str,
    explanation: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The JSON report of one image: prediction, calibration, model identity, checks, time.

    No patient identifiers: the image is identified by its upload name and SHA-256.
    """
    pred = analysis.prediction
    classes = list(summary.classes)
    meta = analysis.raw.meta
    t = summary.threshold
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
                "members": members,
                "n_members": int(np.atleast_2d(pred.member_probs).shape[0]),
                "oof_auroc": summary.auroc,
                "oof_auroc_95ci": list(summary.auroc_ci) if summary.auroc_ci else None,
            },
            "calibration": {
                "method": summary.calibration,
                "ece_before": summary.ece_before,
                "ece_after_crossfit": summary.ece_after,
                "threshold": asdict(t) if t else None,
            },
            "prediction": {
                "decision": pred.predicted,
                "decision_text": decision_text(pred, classes, t),
                "probabilities": {c: float(pred.probs[i]) for i, c in enumerate(classes)},
                "uncalibrated_probabilities": {
                    c: float(pred.raw_probs[i]) for i, c in enumerate(classes)
                },
                "member_probabilities": np.atleast_2d(pred.member_probs).tolist(),
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
