"""The viewer's logic, kept out of the Streamlit script so that it can be unit-tested.

``app/streamlit_app.py`` only lays out widgets; everything it shows is computed here or by the
modules this one calls (:mod:`xraycls.dicom`, :mod:`xraycls.preprocess`, :mod:`xraycls.predict`,
:mod:`xraycls.cam`):

* run bundles: finding them under a folder and summarising them (backbone, data, AUROC with its
  95% interval, calibration and operating threshold) from the bundle's own files;
* uploads: a per-file size cap and the decoder's decompression guard, decoding from the bytes in
  memory (nothing an upload contains is written to disk), rendering, the model input;
* the decision in words, the ensemble spread, the out-of-distribution checks;
* privacy: the header fields shown are non-identifying; patient name, ID and birth date are read
  only on request (:func:`identifying_fields`);
* exports: the JSON report, the batch table and its CSV, PNG encoding.

Out-of-distribution check on intensities. The question "is this image's grey-level distribution
like the training images'?" is answered with the 1-Wasserstein distance between the image's
intensity distribution (on the model input, letterbox bars excluded) and the training set's
Wasserstein barycentre; in one dimension that is the mean absolute difference of quantile
functions, and the barycentre is the mean quantile function. The distance is ranked among the
training images' own leave-one-out distances, which gives a conformal p-value: under the
hypothesis that the image comes from the training distribution it is (super-)uniform, so warning
at ``p <= 0.01`` raises a false alarm on about 1% of in-distribution images.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from xraycls import __version__
from xraycls.dicom import RawImage, XrayImage, load_image, render
from xraycls.errors import ImageReadError, ImageTooLargeError
from xraycls.fsutil import write_json_atomic
from xraycls.preprocess import Letterbox, Preprocessing, resize_to_square

if TYPE_CHECKING:
    from xraycls.cam import CamResult
    from xraycls.predict import Prediction, Predictor

INTENDED_USE = (
    "Research use only. Not a medical device: not for diagnosis, triage or patient management; "
    "every output must be reviewed by a qualified reader."
)
DEFAULT_MAX_UPLOAD_MB = 200
"""Per-file cap on uploads (Streamlit's own ``server.maxUploadSize`` is set to the same value)."""
VIEWER_MAX_PIXELS = 50_000_000
"""Decompression guard for uploads: a header (or PNG/JPEG size) declaring more pixels than this is
refused before decoding. 50 MP is ~3x the largest chest detector (43x43 cm at 0.1 mm)."""
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "DR", "RG"})
"""DICOM Modality values of projection radiographs (CR computed, DX digital, RG film; DR is an old
private spelling of DX)."""
CHEST_BODY_PARTS = ("CHEST", "THORAX", "LUNG", "TORSO")
LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL", "LLD", "RLD"})
QUANTILE_LEVELS = np.linspace(0.01, 0.99, 99)
"""Levels at which intensity distributions are compared (1%..99%: the extreme 1% tails of a
radiograph are collimator edges and markers, not anatomy)."""
OOD_ALPHA = 0.01
INTENSITY_REFERENCE_FILE = "intensity_reference.json"
_IDENTIFYING = (
    ("PatientName", "Patient name"),
    ("PatientID", "Patient ID"),
    ("PatientBirthDate", "Birth date"),
)


class UploadTooLargeError(ImageTooLargeError):
    """An uploaded file is over the viewer's per-file size cap."""

    code = "upload_too_large"


# --------------------------------------------------------------------------- run bundles


@dataclass(frozen=True)
class ThresholdInfo:
    """The binary operating point stored in ``calibration.json``."""

    positive: str
    target: str
    """``sensitivity``, ``specificity`` or ``youden``."""
    value: float | None
    threshold: float
    oof_sensitivity: float | None = None
    oof_specificity: float | None = None

    def describe(self) -> str:
        """E.g. ``95%-sensitivity threshold``."""
        if self.target == "youden" or self.value is None:
            return "Youden threshold"
        return f"{self.value:.0%}-{self.target} threshold"


@dataclass(frozen=True)
class RunSummary:
    """What the viewer shows about a run bundle, read from the bundle's files."""

    path: Path
    name: str
    backbone: str
    image_size: int
    data: str
    n_images: int | None
    n_patients: int | None
    classes: tuple[str, ...]
    auroc: float | None
    auroc_ci: tuple[float, float] | None
    calibration: str | None
    ece_before: float | None
    ece_after: float | None
    threshold: ThresholdInfo | None
    fold_members: int
    has_refit: bool

    def label(self) -> str:
        """One line for a model picker: ``name (backbone, 224 px, AUROC 0.95)``."""
        auc = f", AUROC {self.auroc:.3f}" if self.auroc is not None else ""
        return f"{self.name} ({self.backbone}, {self.image_size} px{auc})"

    def auroc_text(self) -> str:
        """``0.951 [0.930, 0.968]`` (pooled out-of-fold, 95% patient-level bootstrap)."""
        if self.auroc is None:
            return "n/a"
        if self.auroc_ci is None:
            return f"{self.auroc:.3f} (no interval)"
        return f"{self.auroc:.3f} [{self.auroc_ci[0]:.3f}, {self.auroc_ci[1]:.3f}]"

    def calibration_text(self) -> str:
        """Method, ECE before -> after and the operating threshold, in one line."""
        if self.calibration is None:
            return "none (raw softmax probabilities)"
        text = self.calibration
        if self.ece_before is not None and self.ece_after is not None:
            text += f", ECE {self.ece_before:.3f} -> {self.ece_after:.3f} (cross-fitted)"
        if self.threshold is not None:
            t = self.threshold
            text += f"; {t.describe()} {t.threshold:.3f} on P({t.positive})"
        return text


def find_runs(root: str | Path, *, max_depth: int = 4) -> list[Path]:
    """Run bundles (folders with ``bundle.json``, ``config.yaml`` and ``labels.json``) under
    ``root`` or ``root`` itself, sorted by path."""
    root = Path(root)
    if not root.is_dir():
        return []
    found: list[Path] = []

    def walk(d: Path, depth: int) -> None:
        if all((d / f).is_file() for f in ("bundle.json", "config.yaml", "labels.json")):
            found.append(d)
            return
        if depth >= max_depth:
            return
        try:
            children = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return
        for child in children:
            walk(child, depth + 1)

    walk(root, 0)
    return found


def summarize_run(run_dir: str | Path) -> RunSummary:
    """Read a bundle's identity, headline AUROC (with interval) and calibration.

    The AUROC interval is the one the bundle's ``MODEL_CARD.md`` reports (patient-level
    bootstrap); a bundle without a card gets one computed from ``oof_predictions.csv``.

    Raises:
        BundleError: ``bundle.json`` or ``labels.json`` is missing or unreadable.
    """
    from xraycls.bundle import BundleError

    run = Path(run_dir)
    try:
        bundle = json.loads((run / "bundle.json").read_text())
        classes = json.loads((run / "labels.json").read_text())["classes"]
    except (OSError, ValueError, KeyError) as e:
        raise BundleError(f"{run}: not a complete run bundle ({e})") from e
    metrics = _read_json(run / "metrics.json") or {}
    pooled = metrics.get("pooled_oof") or {}
    auroc = _finite(pooled.get("auroc"))
    ci = _card_auroc_ci(run / "MODEL_CARD.md")
    if ci is None and auroc is not None:
        ci = _bootstrap_auroc_ci(run)
    cal_file = _read_json(run / "calibration.json")
    cal_summary = (cal_file or {}).get("summary") or metrics.get("calibration") or {}
    threshold = None
    t = (cal_file or {}).get("threshold")
    if t:
        at = t.get("oof_at_threshold") or {}
        threshold = ThresholdInfo(
            positive=str(t["positive"]),
            target=str(t["target"]),
            value=_finite(t.get("value")),
            threshold=float(t["threshold"]),
            oof_sensitivity=_finite(at.get("sensitivity")),
            oof_specificity=_finite(at.get("specificity")),
        )
    return RunSummary(
        path=run,
        name=run.name,
        backbone=str(bundle.get("model", "?")),
        image_size=int(bundle.get("image_size", 0)),
        data=_data_name(run),
        n_images=metrics.get("n_images"),
        n_patients=metrics.get("n_patients"),
        classes=tuple(classes),
        auroc=auroc,
        auroc_ci=ci,
        calibration=cal_summary.get("method") if cal_file else None,
        ece_before=_finite((cal_summary.get("before") or {}).get("ece")) if cal_file else None,
        ece_after=(
            _finite((cal_summary.get("after_crossfit") or {}).get("ece")) if cal_file else None
        ),
        threshold=threshold,
        fold_members=sum(1 for f in bundle.get("fold_weights", []) if (run / f).is_file()),
        has_refit=(run / "weights.safetensors").is_file(),
    )


def default_members(summary: RunSummary) -> str:
    """``folds`` when the bundle has two or more fold models (their spread is the uncertainty
    to show; calibration and threshold were fitted on their out-of-fold logits), else ``refit``."""
    return "folds" if summary.fold_members >= 2 or not summary.has_refit else "refit"


def bundle_stamp(run_dir: str | Path) -> str:
    """Modification times of a bundle's files: part of the model cache key, so a retrained or
    recalibrated bundle is loaded afresh while an unchanged one never is."""
    run = Path(run_dir)
    parts = []
    for name in ("bundle.json", "config.yaml", "calibration.json", "weights.safetensors"):
        p = run / name
        parts.append(f"{name}:{p.stat().st_mtime_ns if p.exists() else 0}")
    return "|".join(parts)


def _card_auroc_ci(card: Path) -> tuple[float, float] | None:
    try:
        text = card.read_text()
    except OSError:
        return None
    m = re.search(r"^\| model \| [0-9.]+ \[([0-9.]+), ([0-9.]+)\]", text, flags=re.M)
    return (float(m.group(1)), float(m.group(2))) if m else None


def _bootstrap_auroc_ci(run: Path) -> tuple[float, float] | None:
    from scipy.special import softmax
    from sklearn.metrics import roc_auc_score

    from xraycls.bundle import BundleError, read_oof
    from xraycls.metrics import bootstrap_ci

    def auroc(p: np.ndarray, y: np.ndarray) -> float:
        if p.shape[1] == 2:
            return float(roc_auc_score(y, p[:, 1]))
        return float(roc_auc_score(y, p, multi_class="ovr", labels=list(range(p.shape[1]))))

    try:
        oof = read_oof(run)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, lo, hi = bootstrap_ci(
                auroc,
                softmax(oof.logits, axis=1),
                oof.labels,
                groups=oof.groups,
                n_boot=1000,
            )
    except (BundleError, ValueError):
        return None
    return lo, hi


def _data_name(run: Path) -> str:
    import yaml

    try:
        cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return "?"
    return str((cfg.get("data") or {}).get("labels", "?"))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


# --------------------------------------------------------------------------- uploads


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

    Raises:
        ImageReadError: Any failure; the message names the upload and says why.
    """
    check_upload_size(name, len(data), max_mb=max_mb)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # notes travel in meta.warnings
        return load_image(name, data=data, max_pixels=max_pixels)


def model_input(raw: RawImage, prep: Preprocessing) -> tuple[np.ndarray, Letterbox]:
    """The bundle's preprocessing of a decoded image (its window, size and resize mode),
    independent of the window the user chose for display."""
    image = render(raw, window=prep.window, percentiles=prep.percentiles)
    return resize_to_square(image.pixels, prep.image_size, mode=prep.resize)


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
    square, box = model_input(raw, predictor.prep)
    prediction = predictor.predict([square])[0]
    ood = check_ood(raw, box.crop(square), reference)
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


# --------------------------------------------------------------------------- display


def default_window(raw: RawImage) -> tuple[float, float]:
    """The (level, width) a reader starts from: the header's first window, else the
    0.5-99.5 percentile range of the non-padding pixels (rasters: their nominal range)."""
    if raw.meta.header_window is not None:
        return raw.meta.header_window
    if raw.nominal_range is not None:
        lo, hi = raw.nominal_range
    else:
        lo, hi = _percentiles(raw, (0.5, 99.5))
    return (lo + hi) / 2.0, max(hi - lo, 1.0)


def window_limits(raw: RawImage) -> tuple[float, float]:
    """The range of the image's values (padding excluded), widened to hold the default window:
    the extent of a level slider."""
    lo, hi = _percentiles(raw, (0.0, 100.0))
    c, w = default_window(raw)
    lo, hi = min(lo, c - w / 2.0), max(hi, c + w / 2.0)
    return float(lo), float(max(hi, lo + 1.0))


def display_image(raw: RawImage, window: tuple[float, float] | None = None) -> XrayImage:
    """Render for display: the header's VOI (LUT or window) when ``window`` is None, else that
    (level, width); MONOCHROME1 is inverted after the window, as the standard says."""
    return render(raw, window="auto" if window is None else (float(window[0]), float(window[1])))


def _percentiles(raw: RawImage, q: tuple[float, float]) -> tuple[float, float]:
    v = raw.values if raw.padding is None else raw.values[~raw.padding]
    if v.size == 0:
        return 0.0, 1.0
    flat = v.ravel()[:: max(1, v.size // 1_000_000)]
    lo, hi = np.percentile(flat, q)
    return float(lo), float(hi)


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """[0, 1] floats to 0..255 (rounded)."""
    return np.rint(np.clip(pixels, 0.0, 1.0) * 255.0).astype(np.uint8)


def to_png(image: np.ndarray) -> bytes:
    """PNG bytes of an HxW [0, 1] float image or an HxW / HxWx3 uint8 image (lossless)."""
    import cv2  # ~2x faster than Pillow here (60 vs 140 ms for a 1024² RGB image)

    arr = image if image.dtype == np.uint8 else to_uint8(image)
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)  # OpenCV writes BGR
    ok, buf = cv2.imencode(".png", arr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ValueError(f"could not encode a {arr.shape} image as PNG")
    return buf.tobytes()


# --------------------------------------------------------------------------- prediction


def decision_text(
    prediction: Prediction, classes: Sequence[str], threshold: ThresholdInfo | None
) -> str:
    """The decision with its reason, e.g. ``PNEUMONIA — above the 95%-sensitivity threshold``."""
    if threshold is not None and prediction.threshold is not None and len(classes) == 2:
        pos = list(classes).index(threshold.positive) if threshold.positive in classes else 1
        p = float(prediction.probs[pos])
        side = "at or above" if p >= prediction.threshold else "below"
        return (
            f"{prediction.predicted} — P({classes[pos]}) {p:.3f} is {side} the "
            f"{threshold.describe()} ({prediction.threshold:.3f})"
        )
    top = float(np.max(prediction.probs))
    return f"{prediction.predicted} — highest calibrated probability ({top:.3f}); no operating threshold stored"


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


def uncertainty_text(prediction: Prediction, classes: Sequence[str]) -> str:
    """How far to trust the number, honestly: the member spread, and whether members disagree
    about the decision; a single model says that it has no spread to show."""
    m = np.atleast_2d(prediction.member_probs)
    if m.shape[0] < 2:
        return (
            "Single model: no ensemble spread to show. The probability is calibrated on "
            "out-of-fold predictions, which is all the uncertainty information this bundle has."
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


# --------------------------------------------------------------------------- OOD


@dataclass(frozen=True)
class IntensityReference:
    """The training images' intensity distribution, summarised for :func:`intensity_check`."""

    levels: np.ndarray
    """Quantile levels."""
    barycentre: np.ndarray
    """Mean quantile function of the training images (their 1-Wasserstein barycentre)."""
    distances: np.ndarray
    """Sorted leave-one-out W1 distances of the training images to the barycentre."""
    source: str = ""

    @property
    def n(self) -> int:
        """Number of reference images."""
        return len(self.distances)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what a bundle's ``intensity_reference.json`` holds)."""
        return {
            "format": 1,
            "method": "1-Wasserstein distance of the model input's intensity quantiles "
            "(letterbox excluded) to the training barycentre; leave-one-out distances",
            "levels": [round(float(x), 6) for x in self.levels],
            "barycentre": [round(float(x), 6) for x in self.barycentre],
            "distances": [round(float(x), 6) for x in self.distances],
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IntensityReference:
        """Inverse of :meth:`to_dict`."""
        return cls(
            levels=np.asarray(d["levels"], np.float64),
            barycentre=np.asarray(d["barycentre"], np.float64),
            distances=np.sort(np.asarray(d["distances"], np.float64)),
            source=str(d.get("source", "")),
        )


@dataclass(frozen=True)
class IntensityCheck:
    """Where one image's intensity distribution falls relative to the training images'."""

    distance: float
    p_value: float
    flagged: bool
    median: float
    reference_median: float
    n_reference: int

    def message(self) -> str:
        """A sentence for the reader."""
        if self.flagged:
            return (
                f"Intensity distribution far from the training images': W1 distance "
                f"{self.distance:.3f} is larger than {1 - self.p_value:.0%} of the training images' "
                f"(p = {self.p_value:.3f}, n = {self.n_reference}); median grey level "
                f"{self.median:.2f} vs {self.reference_median:.2f} in training."
            )
        return (
            f"Intensity distribution within the training range (W1 {self.distance:.3f}, "
            f"p = {self.p_value:.2f}, n = {self.n_reference})."
        )


@dataclass
class OODReport:
    """Out-of-distribution findings for one image."""

    header_warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    intensity: IntensityCheck | None = None

    @property
    def flagged(self) -> bool:
        """Whether any check says the image is outside the model's intended inputs."""
        return bool(self.header_warnings) or bool(self.intensity and self.intensity.flagged)

    def warnings(self) -> list[str]:
        """All warning sentences."""
        out = list(self.header_warnings)
        if self.intensity is not None and self.intensity.flagged:
            out.append(self.intensity.message())
        return out


def quantile_function(pixels: np.ndarray, levels: np.ndarray = QUANTILE_LEVELS) -> np.ndarray:
    """Quantiles of an image's intensities at ``levels`` (a ~250k-pixel stride sample)."""
    flat = np.asarray(pixels, np.float32).ravel()
    if flat.size == 0:
        return np.zeros(len(levels))
    return np.quantile(flat[:: max(1, flat.size // 250_000)], levels)


def build_intensity_reference(
    images: Iterable[np.ndarray], *, levels: np.ndarray = QUANTILE_LEVELS, source: str = ""
) -> IntensityReference:
    """Summarise training images (preprocessed model inputs, letterbox bars cropped away).

    This is what a training run should store as ``intensity_reference.json``.

    Raises:
        ValueError: Fewer than 2 images.
    """
    q = np.stack([quantile_function(img, levels) for img in images])
    n = len(q)
    if n < 2:
        raise ValueError(f"need at least 2 reference images, got {n}")
    total = q.sum(0)
    loo = (total[None, :] - q) / (n - 1)  # barycentre without image i
    distances = np.abs(q - loo).mean(1)
    return IntensityReference(
        levels=np.asarray(levels, np.float64),
        barycentre=total / n,
        distances=np.sort(distances),
        source=source,
    )


def intensity_check(
    pixels: np.ndarray, reference: IntensityReference, *, alpha: float = OOD_ALPHA
) -> IntensityCheck:
    """Conformal test of an image's intensities against the training images'.

    Args:
        pixels: The model input with letterbox bars cropped away (values in [0, 1]).
        reference: From :func:`build_intensity_reference`.
        alpha: Warn when the p-value is at most this. With fewer than ``1/alpha - 1`` reference
            images the smallest attainable p-value is ``1/(n+1)``, and that is used instead
            (the image is farther than every training image).
    """
    q = quantile_function(pixels, reference.levels)
    d = float(np.abs(q - reference.barycentre).mean())
    n = reference.n
    at_least = n - int(np.searchsorted(reference.distances, d, side="left"))
    p = (1 + at_least) / (n + 1)
    mid = int(np.argmin(np.abs(reference.levels - 0.5)))
    return IntensityCheck(
        distance=d,
        p_value=p,
        flagged=p <= max(alpha, 1.0 / (n + 1)),
        median=float(q[mid]),
        reference_median=float(reference.barycentre[mid]),
        n_reference=n,
    )


def header_check(raw: RawImage) -> tuple[list[str], list[str]]:
    """Whether the DICOM header says chest radiograph (Modality, BodyPartExamined, view).

    Returns:
        ``(warnings, notes)``: warnings for a header that says something else, notes for what
        cannot be checked.
    """
    meta = raw.meta
    warns: list[str] = []
    notes: list[str] = []
    if meta.format != "dicom":
        notes.append(
            f"{meta.format.upper()} has no DICOM header: modality and body part cannot be checked."
        )
        return warns, notes
    modality = (meta.modality or "").upper()
    if not modality:
        notes.append("The header does not state the Modality.")
    elif modality not in RADIOGRAPH_MODALITIES:
        warns.append(
            f"Not a radiograph by its header: Modality is {modality} (expected CR or DX). "
            "The model was not trained on this kind of image."
        )
    part = (meta.body_part or "").upper()
    if not part:
        notes.append("The header does not state BodyPartExamined.")
    elif not any(p in part for p in CHEST_BODY_PARTS):
        warns.append(
            f"Not a chest image by its header: BodyPartExamined is {meta.body_part}. "
            "The model was trained on chest radiographs only."
        )
    view = (meta.view_position or "").upper()
    if view in LATERAL_VIEWS:
        warns.append(
            f"Lateral view (ViewPosition {view}): the model expects frontal (AP/PA) views."
        )
    return warns, notes


def check_ood(
    raw: RawImage, content: np.ndarray, reference: IntensityReference | None
) -> OODReport:
    """Header check plus, when a reference is available, the intensity check on ``content``
    (the model input without letterbox bars)."""
    warns, notes = header_check(raw)
    report = OODReport(header_warnings=warns, notes=notes)
    if reference is None:
        report.notes.append("No training intensity reference: the intensity check was skipped.")
    else:
        report.intensity = intensity_check(content, reference)
    return report


def intensity_reference_for_run(
    run_dir: str | Path, prep: Preprocessing, *, max_images: int = 200, seed: int = 0
) -> tuple[IntensityReference | None, str]:
    """The bundle's stored intensity reference, else one computed from its training images.

    A bundle may carry ``intensity_reference.json`` (see :func:`build_intensity_reference`).
    Without it, up to ``max_images`` images listed in ``oof_predictions.csv`` (every image of
    the cross-validation) are sampled, preprocessed with the bundle's preprocessing, and
    summarised; nothing is written to the bundle.

    Returns:
        The reference (None when neither is available) and a sentence saying where it came from.
    """
    run = Path(run_dir)
    stored = _read_json(run / INTENSITY_REFERENCE_FILE)
    if stored is not None:
        try:
            ref = IntensityReference.from_dict(stored)
            return ref, f"stored in the bundle ({INTENSITY_REFERENCE_FILE}, {ref.n} images)"
        except (KeyError, ValueError, TypeError):
            pass
    paths = _training_paths(run)
    if not paths:
        return None, "the bundle stores no intensity reference and lists no training images"
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(paths))
    images = []
    for i in order:
        if len(images) >= max_images:
            break
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # colour, multi-frame notes: not relevant here
                raw = load_image(paths[i], max_pixels=VIEWER_MAX_PIXELS)
        except ImageReadError:
            continue
        square, box = model_input(raw, prep)
        images.append(box.crop(square))
    if len(images) < 2:
        return None, (
            f"the bundle stores no intensity reference and its training images "
            f"({len(paths)} listed in oof_predictions.csv) are not readable from here"
        )
    ref = build_intensity_reference(
        images, source=f"computed from {len(images)} of {len(paths)} training images"
    )
    return ref, ref.source + " listed in oof_predictions.csv (not stored in the bundle)"


def store_intensity_reference(
    run_dir: str | Path, prep: Preprocessing, *, max_images: int = 200
) -> IntensityReference | None:
    """Compute the run's intensity reference from its training images and store it in the
    bundle (``intensity_reference.json``), so that the viewer's out-of-distribution check works
    wherever the bundle is copied, without the training data. ``xraycls train`` calls this."""
    run = Path(run_dir)
    (run / INTENSITY_REFERENCE_FILE).unlink(missing_ok=True)
    ref, _ = intensity_reference_for_run(run, prep, max_images=max_images)
    if ref is not None:
        write_json_atomic(run / INTENSITY_REFERENCE_FILE, ref.to_dict())
    return ref


def _training_paths(run: Path) -> list[str]:
    try:
        with (run / "oof_predictions.csv").open(newline="") as f:
            return [r["path"] for r in csv.DictReader(f) if r.get("path")]
    except (OSError, KeyError, csv.Error):
        return []


# --------------------------------------------------------------------------- privacy


def safe_header(raw: RawImage) -> dict[str, str]:
    """Non-identifying facts about an image, for display. No name, ID, birth date or UIDs;
    the patient appears only as a salted pseudonym."""
    m = raw.meta
    rows: dict[str, Any] = {
        "Format": m.format.upper(),
        "Size (rows x columns)": f"{m.original_shape[0]} x {m.original_shape[1]}",
        "Modality": m.modality,
        "Body part": m.body_part,
        "View": m.view_position,
        "Photometric": m.photometric,
        "Bits stored": m.bits_stored,
        "Pixel spacing (mm)": (
            f"{m.pixel_spacing[0]:g} x {m.pixel_spacing[1]:g}" if m.pixel_spacing else None
        ),
        "Header window (level/width)": (
            f"{m.header_window[0]:g} / {m.header_window[1]:g}" if m.header_window else None
        ),
        "VOI LUT sequence": "yes" if m.has_voi_lut else None,
        "Patient (pseudonym)": m.patient_hash,
        "Decoder notes": "; ".join(m.warnings) or None,
    }
    return {k: str(v) for k, v in rows.items() if v is not None}


def identifying_fields(data: bytes) -> dict[str, str]:
    """Patient name, ID and birth date from a DICOM file's bytes; only call this when the user
    asked to reveal them. Empty for non-DICOM files or when the elements are absent."""
    import pydicom

    from xraycls.dicom import sniff_format

    if sniff_format(data[:132]) != "dicom":
        return {}
    try:
        ds = pydicom.dcmread(
            io.BytesIO(data),
            stop_before_pixels=True,
            force=data[128:132] != b"DICM",
            specific_tags=[kw for kw, _ in _IDENTIFYING],
        )
    except Exception:  # a header that cannot be parsed has nothing to reveal
        return {}
    out = {}
    for kw, label in _IDENTIFYING:
        v = ds.get(kw)
        if v is not None and str(v).strip():
            out[label] = str(v).strip()
    return out


# --------------------------------------------------------------------------- exports


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
    return _json_safe(
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


def _json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return x


# --------------------------------------------------------------------------- explanation


def cam_sizes(image_size: int, backbone: str) -> list[int]:
    """CAM input sizes to offer: the model's, and 512/256 px below it (not for ViT, whose
    position embeddings fix its input size)."""
    smaller = [] if backbone.startswith("vit") else [s for s in (512, 256) if s < image_size]
    return [image_size, *smaller]


def default_cam_size(image_size: int, backbone: str, device: str) -> int:
    """The model's input size on a GPU; on a CPU at most 512 px (a 1024-px CAM costs ~4x more
    time and memory than a 512-px one, 9 s and 6 GB for Swin-T on two cores)."""
    sizes = cam_sizes(image_size, backbone)
    return 512 if device != "cuda" and 512 in sizes else image_size


def explain(
    predictor: Predictor,
    analysis: Analysis,
    *,
    method: str = "gradcam",
    target: str | None = None,
    cam_size: int | None = None,
) -> CamResult:
    """The CAM of one analysed upload for ``target`` (default: the decision), computed on the
    same model input the prediction used, by every ensemble member together."""
    from xraycls.cam import explain_pixels

    wanted = analysis.prediction.predicted if target is None else target
    return explain_pixels(
        predictor, [analysis.model_input], method=method, target=wanted, cam_size=cam_size
    )[0]


def overlay_image(display: np.ndarray, heatmap: np.ndarray, *, alpha: float = 0.4) -> np.ndarray:
    """A heatmap on the original pixel grid (:meth:`CamResult.to_original`) blended over the
    displayed (windowed) image or the same crop of both: HxWx3 uint8."""
    from xraycls.cam import overlay

    return overlay(display, heatmap, alpha=alpha)


def zoom_box(
    shape: tuple[int, int], zoom: float, center: tuple[float, float] = (0.5, 0.5)
) -> tuple[slice, slice]:
    """The region a zoomed view shows: ``1/zoom`` of each side around ``center`` (fractions of
    height and width), kept inside the image. Cropping instead of scaling keeps every shown
    pixel a pixel of the original."""
    h, w = shape
    ch, cw = max(1, round(h / zoom)), max(1, round(w / zoom))
    y0 = min(max(round(center[0] * h - ch / 2), 0), h - ch)
    x0 = min(max(round(center[1] * w - cw / 2), 0), w - cw)
    return slice(y0, y0 + ch), slice(x0, x0 + cw)
