"""Rendering radiographs for people: the reader's window, its limits, PNG encoding.

The model's input is :func:`xraycls.io.preprocess.prepare`; this is what a viewer shows, with
a window a reader can change without decoding again.
"""

from __future__ import annotations

import numpy as np

from xraycls.io.image import RawImage, XrayImage, render


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
