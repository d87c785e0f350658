"""Is an image the kind of input the model was trained on? Header and intensity checks.

Used wherever a prediction is written (``xraycls predict``, ``evaluate``, the viewer), and by
training, which stores the intensity reference of its own images in the bundle.

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

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xraycls.errors import ImageReadError
from xraycls.io.image import ImageMeta, RawImage
from xraycls.io.preprocess import Preprocessing, prepare
from xraycls.io.read import load_image

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

    def reasons(self) -> str:
        """The flags in a few words for a table cell: the first sentence of each header warning
        and the intensity p-value (empty when nothing is flagged)."""
        out = [w.split(". ", 1)[0].rstrip(".") for w in self.header_warnings]
        if self.intensity is not None and self.intensity.flagged:
            out.append(f"intensity far from training (p={self.intensity.p_value:.3f})")
        return "; ".join(out)


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


def header_check(
    image: ImageMeta | RawImage, *, age_range: tuple[float, float] | None = None
) -> tuple[list[str], list[str]]:
    """Whether the DICOM header says chest radiograph (Modality, BodyPartExamined, view) of a
    patient of the training population's ages (``age_range`` in years, when the bundle states
    one).

    Returns:
        ``(warnings, notes)``: warnings for a header that says something else, notes for what
        cannot be checked.
    """
    meta = image.meta if isinstance(image, RawImage) else image
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
    if age_range is not None:
        age = meta.patient_age_years
        lo, hi = age_range
        if age is None:
            notes.append("The header states no patient age: the age range cannot be checked.")
        elif not lo <= age < hi + 1:  # "1-5 years" includes a 5.9-year-old
            warns.append(
                f"Patient age {age:.0f} years is outside the training population's "
                f"{lo:g}-{hi:g} years. The model has not been validated on such patients."
            )
    return warns, notes


def check_ood(
    image: ImageMeta | RawImage | None,
    content: np.ndarray,
    reference: IntensityReference | None,
    *,
    age_range: tuple[float, float] | None = None,
) -> OODReport:
    """Header check (when the header is known) plus, when a reference is available, the
    intensity check on ``content`` (the model input without letterbox bars)."""
    warns, notes = header_check(image, age_range=age_range) if image is not None else ([], [])
    report = OODReport(header_warnings=warns, notes=notes)
    if reference is None:
        report.notes.append("No training intensity reference: the intensity check was skipped.")
    else:
        report.intensity = intensity_check(content, reference)
    return report


@dataclass(frozen=True)
class OODCriteria:
    """What a bundle knows of its training inputs: the intensity reference of its images and
    the training population's ages. Checks an image against both (and its header's modality,
    body part and view)."""

    reference: IntensityReference | None = None
    age_range: tuple[float, float] | None = None
    """Years, as the training data documents them (``data.age_range``)."""

    def check(self, image: ImageMeta | RawImage | None, content: np.ndarray) -> OODReport:
        """:func:`check_ood` with these criteria."""
        return check_ood(image, content, self.reference, age_range=self.age_range)


def reference_from_files(
    paths: Sequence[str],
    prep: Preprocessing,
    *,
    max_images: int = 200,
    seed: int = 0,
    max_pixels: int | None = None,
) -> IntensityReference | None:
    """The intensity reference of up to ``max_images`` of ``paths`` (a seeded random sample),
    preprocessed with ``prep``; unreadable files are skipped. None with fewer than 2 readable."""
    order = np.random.default_rng(seed).permutation(len(paths))
    images = []
    for i in order:
        if len(images) >= max_images:
            break
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # colour, multi-frame notes: not relevant here
                raw = (
                    load_image(paths[i])
                    if max_pixels is None
                    else load_image(paths[i], max_pixels=max_pixels)
                )
        except ImageReadError:
            continue
        square, box, _ = prepare(raw, prep)
        images.append(box.crop(square))
    if len(images) < 2:
        return None
    return build_intensity_reference(
        images, source=f"computed from {len(images)} of {len(paths)} training images"
    )
