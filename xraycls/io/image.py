"""Radiographs in memory: decoded values, their metadata, and rendering them to [0, 1].

The rendering order follows DICOM PS3.4 N.2: stored values -> Modality LUT (rescale or LUT
sequence, applied by the decoder) -> VOI (LUT sequence or window) -> MONOCHROME1 inversion ->
[0, 1]. Inverting *after* the VOI matters: windowing an inverted image with the header's
centre/width (torchxrayvision's ``read_xray_dcm`` does this) renders nonsense.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from xraycls.errors import ImageReadError, ImageTooLargeError, InvalidImageError

WindowMode = Literal["auto", "header", "none", "percentile"]
"""How to map modality values to [0, 1].

``auto``: the header's VOI (LUT sequence or first window) when present, else ``percentile``
(rasters: their nominal 8/16-bit range). ``header``: the header's VOI, else ``none``.
``none``: min-max over the image (rasters: nominal range). ``percentile``: clip at
:data:`DEFAULT_PERCENTILES` of the non-padding pixels. A ``(center, width)`` tuple windows with
those values (DICOM LINEAR function, modality units).
"""
Window = WindowMode | tuple[float, float]

DEFAULT_PERCENTILES = (0.5, 99.5)
DEFAULT_MAX_PIXELS = 100_000_000
"""Memory guard: a frame with more pixels than this is refused before decoding (100 MP is ~8x a
43x43 cm detector at 0.1 mm)."""
MAX_FILE_BYTES = 2 * 1024**3

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601


@dataclass(frozen=True)
class ImageMeta:
    """What is known about an image besides its pixels. Never holds a patient's name or raw ID."""

    path: str
    format: Literal["dicom", "png", "jpeg"]
    original_shape: tuple[int, int]
    photometric: str | None = None
    modality: str | None = None
    body_part: str | None = None
    view_position: str | None = None
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None
    patient_hash: str | None = None
    patient_age_years: float | None = None
    """From PatientAge (``062Y``, ``018M``...), else from the birth and study dates; used only
    to check the image against the training population's ages."""
    pixel_spacing: tuple[float, float] | None = None
    bits_stored: int | None = None
    header_window: tuple[float, float] | None = None
    """First (center, width) from the header, in modality units; defaults for a viewer."""
    has_voi_lut: bool = False
    window_applied: str = ""
    """How :func:`render` mapped values to [0, 1], e.g. ``window 15000/30000`` or ``percentile``."""
    warnings: tuple[str, ...] = ()


@dataclass
class RawImage:
    """Decoded values in modality units, ready to be rendered with any window."""

    values: np.ndarray
    """float32 HxW, after the Modality LUT."""
    meta: ImageMeta
    padding: np.ndarray | None = None
    """bool HxW, True where the stored value is PixelPaddingValue (excluded from statistics)."""
    invert: bool = False
    """MONOCHROME1: the display is inverted *after* the VOI."""
    nominal_range: tuple[float, float] | None = None
    """For rasters: the range that maps to [0, 1] when no window is applied."""
    voi: Any = field(default=None, repr=False)
    """The header's VOI transform (a callable on values), when the header has one."""


@dataclass
class XrayImage:
    """A rendered radiograph: float32 HxW pixels in [0, 1] (bright = dense) and its metadata."""

    pixels: np.ndarray
    meta: ImageMeta


_PASS_THROUGH = (KeyboardInterrupt, SystemExit, GeneratorExit)


@contextmanager
def decoding(path: str | Path) -> Iterator[None]:
    """Turn anything a decoder raises into an :class:`ImageReadError` naming ``path``.

    Native plugins raise more than ``Exception``: a Rust panic (pyo3's ``PanicException``)
    derives from ``BaseException`` and would escape every ``except Exception``. Only
    ``KeyboardInterrupt``, ``SystemExit`` and ``GeneratorExit`` pass through.
    """
    try:
        yield
    except (ImageReadError, *_PASS_THROUGH):
        raise
    except MemoryError as e:
        raise ImageTooLargeError(path, "out of memory while decoding") from e
    except BaseException as e:
        msg = " ".join(str(e).split())[:300]
        raise ImageReadError(path, f"the decoder failed: {type(e).__name__}: {msg}") from e


def check_values(raw: RawImage) -> RawImage:
    """Refuse decoded values that are not a finite 2-D image (see :class:`InvalidImageError`)."""
    v, path = raw.values, raw.meta.path
    if not isinstance(v, np.ndarray) or v.ndim != 2 or v.size == 0:
        shape = "x".join(map(str, getattr(v, "shape", ()))) or "no array"
        raise InvalidImageError(
            path,
            f"decoded pixel data has shape {shape}, not a 2-D image (the header's Rows, Columns, "
            "SamplesPerPixel or NumberOfFrames disagree with the pixel data)",
        )
    # The float64 sum of float32 values cannot overflow, so it is finite iff every value is.
    if not math.isfinite(float(np.sum(v, dtype=np.float64))):
        bad = int(np.count_nonzero(~np.isfinite(v)))
        raise InvalidImageError(
            path,
            f"{bad:,} of {v.size:,} pixel values are NaN or infinite after the Modality LUT "
            "(check RescaleSlope/RescaleIntercept or the Modality LUT)",
        )
    return raw


def render(
    raw: RawImage,
    *,
    window: Window = "auto",
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
) -> XrayImage:
    """Map modality values to float32 [0, 1] (bright = dense). See :data:`WindowMode`.

    Raises:
        InvalidImageError: The window (e.g. a width of 1e308) gives non-finite pixels.
        ImageReadError: The header's VOI cannot be applied (a malformed VOI LUT).
    """
    with decoding(raw.meta.path):
        image = _render(raw, window=window, percentiles=percentiles)
    if not math.isfinite(float(np.sum(image.pixels, dtype=np.float64))):
        raise InvalidImageError(
            raw.meta.path,
            f"the window ({image.meta.window_applied}) gives NaN or infinite pixels; the "
            "header's window values are unusable",
        )
    return image


def _render(raw: RawImage, *, window: Window, percentiles: tuple[float, float]) -> XrayImage:
    values, meta = raw.values, raw.meta
    valid = values if raw.padding is None else values[~raw.padding]
    if valid.size == 0:  # an image that is all padding: render it black rather than fail
        valid = np.zeros(1, np.float32)

    mode = window
    if mode == "auto":
        if raw.voi is not None:
            mode = "header"
        elif raw.nominal_range is not None:
            mode = "none"
        else:
            mode = "percentile"
    if mode == "header" and raw.voi is None:
        mode = "none"

    if isinstance(mode, tuple):
        center, width = float(mode[0]), float(mode[1])
        out = apply_window(values, center, width)
        applied = f"window {center:g}/{width:g}"
    elif mode == "header":
        out, applied = raw.voi(values)
    elif mode == "percentile":
        flat = valid.ravel()  # percentiles of a ~1M-pixel stride sample: same limits, 4x faster
        lo, hi = np.percentile(flat[:: max(1, flat.size // 1_000_000)], percentiles)
        out = linear(values, float(lo), float(hi))
        applied = f"percentile {percentiles[0]:g}-{percentiles[1]:g}"
    elif mode == "none":
        lo, hi = raw.nominal_range or (float(valid.min()), float(valid.max()))
        out = linear(values, lo, hi)
        applied = "nominal range" if raw.nominal_range else "min-max"
    else:
        raise ValueError(f"unknown window {window!r}: use auto, header, none, percentile or (c, w)")

    pixels = out.astype(np.float32, copy=False)  # every branch returned a fresh array in [0, 1]
    if raw.invert:
        np.subtract(np.float32(1.0), pixels, out=pixels)
        applied += (
            ", MONOCHROME1 inverted"
            if meta.photometric == "MONOCHROME1"
            else ", inverted (Presentation LUT Shape INVERSE)"
        )
    if raw.padding is not None:
        pixels[raw.padding] = 0.0
    return XrayImage(pixels=pixels, meta=replace(meta, window_applied=applied))


def apply_window(
    values: np.ndarray, center: float, width: float, function: str = "LINEAR"
) -> np.ndarray:
    """DICOM VOI windowing (PS3.3 C.11.2.1.2) with the output scaled to [0, 1].

    Args:
        values: Modality values.
        center: Window Center.
        width: Window Width (>= 1 for LINEAR, > 0 otherwise).
        function: VOI LUT Function: ``LINEAR``, ``LINEAR_EXACT`` or ``SIGMOID``.
    """
    x = values.astype(np.float32, copy=False)
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        out = np.multiply(x - center, -4.0 / max(width, 1e-6), dtype=np.float32)
        np.exp(out, out=out)
        out += 1.0
        return np.reciprocal(out, out=out)
    if function == "LINEAR_EXACT":
        lo, scale = center - width / 2.0, 1.0 / max(width, 1e-6)
    else:
        # LINEAR: the -0.5 and (w - 1) come from the standard's integer-centred definition.
        lo, scale = center - 0.5 - (width - 1.0) / 2.0, 1.0 / max(width - 1.0, 1e-6)
    out = x - np.float32(lo)  # one temporary, then in place: these are 4-megapixel images
    out *= np.float32(scale)
    return np.clip(out, 0.0, 1.0, out=out)


def linear(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros(values.shape, np.float32)
    out = values.astype(np.float32, copy=False) - np.float32(lo)
    out *= np.float32(1.0 / (hi - lo))
    return np.clip(out, 0.0, 1.0, out=out)


def luminance(rgb: np.ndarray) -> np.ndarray:
    return (rgb[..., :3].astype(np.float32) @ _LUMA).astype(np.float32)
