"""One image, end to end: decode an upload in memory, predict it, check it, explain it.

What the viewer shows for each upload comes from here; the screen itself is composed in
:mod:`xraycls.viewer` and ``app/streamlit_app.py``.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from xraycls.errors import ImageReadError, ImageTooLargeError
from xraycls.io.image import RawImage
from xraycls.io.isolate import shared_pool
from xraycls.io.ood import IntensityReference, OODCriteria, OODReport
from xraycls.io.preprocess import Letterbox, prepare
from xraycls.io.read import load_image

if TYPE_CHECKING:
    from xraycls.bundle.summary import ServedSummary, ThresholdInfo
    from xraycls.inference.cam import CamResult
    from xraycls.inference.predictor import Prediction, Predictor

DEFAULT_MAX_UPLOAD_MB = 200
"""Per-file cap on uploads (Streamlit's own ``server.maxUploadSize`` is set to the same value)."""
VIEWER_MAX_PIXELS = 50_000_000
"""Decompression guard for uploads: a header (or PNG/JPEG size) declaring more pixels than this is
refused before decoding. 50 MP is ~3x the largest chest detector (43x43 cm at 0.1 mm)."""


class UploadTooLargeError(ImageTooLargeError):
    """An uploaded file is over the viewer's per-file size cap."""

    code = "upload_too_large"


@dataclass
class Analysis:
    """One decoded, predicted and checked upload."""

    name: str
    sha256: str
    raw: RawImage
    model_input: np.ndarray
    """The bundle's preprocessing of the image: ``size``x``size`` float32 in [0, 1]."""
    letterbox: Letterbox
    prediction: Prediction
    ood: OODReport


@dataclass
class UploadFailure:
    """An upload that could not be analysed, with a message naming the file and the reason."""

    name: str
    message: str
    code: str = "unreadable"


def check_upload_size(name: str, size: int, *, max_mb: float = DEFAULT_MAX_UPLOAD_MB) -> None:
    """Refuse a file over the per-file cap before anything decodes it.

    Raises:
        UploadTooLargeError: The message names the file, its size and the cap.
    """
    if size > max_mb * 1024**2:
        raise UploadTooLargeError(
            name, f"file is {size / 1024**2:.1f} MB, over the {max_mb:g} MB per-file limit"
        )


def decode_upload(
    name: str,
    data: bytes,
    *,
    max_mb: float = DEFAULT_MAX_UPLOAD_MB,
    max_pixels: int = VIEWER_MAX_PIXELS,
) -> RawImage:
    """Decode an uploaded file from its bytes in memory (DICOM with or without extension, PNG,
    JPEG): the size cap, then the decoder's pixel-count guard before any pixel is decoded.

    The decoding runs in the server's isolated decoder process
    (:func:`~xraycls.io.isolate.shared_pool`): an upload that aborts or hangs a codec is this
    upload's error (``decoder_crashed`` / ``decoder_timeout``); the server lives on.

    Raises:
        ImageReadError: Any failure; the message names the upload and says why.
    """
    check_upload_size(name, len(data), max_mb=max_mb)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # notes travel in meta.warnings
        raw: RawImage = shared_pool().run(load_image, name, data=data, max_pixels=max_pixels)
    return raw


def analyse(
    predictor: Predictor,
    name: str,
    data: bytes,
    *,
    reference: IntensityReference | None = None,
    max_mb: float = DEFAULT_MAX_UPLOAD_MB,
    max_pixels: int = VIEWER_MAX_PIXELS,
) -> Analysis:
    """Decode, preprocess, predict and check one upload.

    Raises:
        ImageReadError: The file cannot be read; the message names it and says why.
    """
    raw = decode_upload(name, data, max_mb=max_mb, max_pixels=max_pixels)
    # The bundle's preprocessing, whatever window the reader chose for display.
    square, box, _ = prepare(raw, predictor.prep)
    prediction = predictor.predict([square])[0]
    ood = OODCriteria(reference, predictor.ood.age_range).check(raw, box.crop(square))
    return Analysis(
        name=name,
        sha256=hashlib.sha256(data).hexdigest(),
        raw=raw,
        model_input=square,
        letterbox=box,
        prediction=prediction,
        ood=ood,
    )


def analyse_many(
    predictor: Predictor,
    uploads: Sequence[tuple[str, bytes]],
    *,
    reference: IntensityReference | None = None,
    max_mb: float = DEFAULT_MAX_UPLOAD_MB,
    max_pixels: int = VIEWER_MAX_PIXELS,
) -> list[Analysis | UploadFailure]:
    """:func:`analyse` each ``(name, bytes)``; a bad file becomes an :class:`UploadFailure`
    and the others still go through."""
    out: list[Analysis | UploadFailure] = []
    for name, data in uploads:
        try:
            out.append(
                analyse(
                    predictor,
                    name,
                    data,
                    reference=reference,
                    max_mb=max_mb,
                    max_pixels=max_pixels,
                )
            )
        except ImageReadError as e:
            out.append(failure_from(e, name))
    return out


def failure_from(error: ImageReadError, name: str) -> UploadFailure:
    """An :class:`UploadFailure` whose message is ``name: reason``."""
    return UploadFailure(name=name, message=f"{name}: {error.reason}", code=error.code)


def decision_text(
    prediction: Prediction, classes: Sequence[str], threshold: ThresholdInfo | None
) -> str:
    """The decision with its reason, e.g. ``PNEUMONIA — above the 95%-sensitivity threshold``.

    Multi-label: the findings at or above their own thresholds, e.g. ``Effusion, Edema — at or
    above their operating thresholds (2 of 14 findings)``."""
    if prediction.decisions is not None:
        present = [c for c, d in zip(classes, prediction.decisions, strict=True) if d]
        rule = (
            "operating thresholds"
            if prediction.calibrated
            else "uncalibrated default of 0.5 (this bundle has no calibration)"
        )
        if not present:
            top = int(np.argmax(prediction.probs))
            return (
                f"no finding at or above its {rule} — the most probable is {classes[top]} "
                f"({float(prediction.probs[top]):.3f})"
            )
        return (
            f"{', '.join(present)} — at or above their {rule} ({len(present)} of "
            f"{len(classes)} findings)"
        )
    if threshold is not None and prediction.threshold is not None and len(classes) == 2:
        pos = list(classes).index(threshold.positive) if threshold.positive in classes else 1
        p = float(prediction.probs[pos])
        side = "at or above" if p >= prediction.threshold else "below"
        return (
            f"{prediction.predicted} — P({classes[pos]}) {p:.3f} is {side} the "
            f"{threshold.describe()} ({prediction.threshold:.3f})"
        )
    top = float(np.max(prediction.probs))
    kind = "calibrated probability" if prediction.calibrated else "probability (uncalibrated)"
    return f"{prediction.predicted} — highest {kind} ({top:.3f}); no operating threshold stored"


@dataclass(frozen=True)
class ClassUncertainty:
    """One class's calibrated probability and the spread of the ensemble members around it."""

    name: str
    probability: float
    raw_probability: float
    member_min: float
    member_max: float
    member_std: float
    members: int


def uncertainty(prediction: Prediction, classes: Sequence[str]) -> list[ClassUncertainty]:
    """Per-class probability and member spread (min, max, standard deviation)."""
    m = np.atleast_2d(prediction.member_probs)
    return [
        ClassUncertainty(
            name=c,
            probability=float(prediction.probs[i]),
            raw_probability=float(prediction.raw_probs[i]),
            member_min=float(m[:, i].min()),
            member_max=float(m[:, i].max()),
            member_std=float(m[:, i].std()),
            members=int(m.shape[0]),
        )
        for i, c in enumerate(classes)
    ]


@dataclass(frozen=True)
class FindingRow:
    """One line of the viewer's findings table: the served model's calibrated probability and
    decision for one finding, the ensemble members' spread, and how that finding's operating
    point did on patients none of the bundle's models saw (cross-fitted, 95% intervals)."""

    name: str
    probability: float
    member_min: float
    member_max: float
    present: bool
    threshold: float | None
    auroc: dict[str, float] | None
    sensitivity: dict[str, float] | None
    specificity: dict[str, float] | None


def findings_table(
    prediction: Prediction, classes: Sequence[str], served: ServedSummary | None
) -> list[FindingRow]:
    """The findings of a multi-label prediction, most probable first."""
    if prediction.decisions is None or prediction.thresholds is None:
        raise ValueError("findings_table needs a multi-label prediction")
    m = np.atleast_2d(prediction.member_probs)
    stored = served.findings if served is not None else {}
    rows = []
    for i, c in enumerate(classes):
        f = stored.get(c)
        rows.append(
            FindingRow(
                name=c,
                probability=float(prediction.probs[i]),
                member_min=float(m[:, i].min()),
                member_max=float(m[:, i].max()),
                present=bool(prediction.decisions[i]),
                threshold=float(prediction.thresholds[i]) if prediction.calibrated else None,
                auroc=f.auroc if f else None,
                sensitivity=f.sensitivity if f else None,
                specificity=f.specificity if f else None,
            )
        )
    return sorted(rows, key=lambda r: -r.probability)


def uncertainty_text(prediction: Prediction, classes: Sequence[str]) -> str:
    """How far to trust the number, honestly: the member spread, and whether members disagree
    about the decision; a single model says that it has no spread to show."""
    m = np.atleast_2d(prediction.member_probs)
    if m.shape[0] < 2:
        return "Single model: no ensemble spread to show. " + (
            "The probability is calibrated on patients the model never saw."
            if prediction.calibrated
            else "The probability is uncalibrated (this bundle has no calibration holdout)."
        )
    if prediction.decisions is not None and prediction.thresholds is not None:
        split = [
            c
            for i, c in enumerate(classes)
            if 0 < int(np.sum(m[:, i] >= prediction.thresholds[i])) < m.shape[0]
        ]
        return f"{m.shape[0]} fold models; " + (
            f"they disagree on {', '.join(split)} (some at or above the threshold, some below)."
            if split
            else "all agree on every finding's decision."
        )
    if len(classes) == 2 and prediction.threshold is not None:
        above = int(np.sum(m[:, 1] >= prediction.threshold))
        agree = (
            "all agree on the decision"
            if above in (0, m.shape[0])
            else f"{above} of {m.shape[0]} are at or above the threshold: the members disagree"
        )
        return (
            f"{m.shape[0]} fold models: P({classes[1]}) ranges {m[:, 1].min():.3f}-"
            f"{m[:, 1].max():.3f}; {agree}."
        )
    picks = [classes[int(i)] for i in m.argmax(1)]
    return f"{m.shape[0]} fold models; their top classes: {', '.join(picks)}."


def explain(
    predictor: Predictor,
    analysis: Analysis,
    *,
    method: str = "gradcam",
    target: str | None = None,
    cam_size: int | None = None,
) -> CamResult:
    """The CAM of one analysed upload for ``target`` (default: the decision; multi-label: the
    most probable finding), computed on the same model input the prediction used, by every
    ensemble member together."""
    from xraycls.inference.cam import explain_pixels

    pred = analysis.prediction
    if target is None and pred.decisions is not None:
        wanted: str = predictor.classes[int(np.argmax(pred.probs))]
    else:
        wanted = pred.predicted if target is None else target
    return explain_pixels(
        predictor, [analysis.model_input], method=method, target=wanted, cam_size=cam_size
    )[0]
