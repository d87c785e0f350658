"""PNG and JPEG radiographs (8- and 16-bit grey, colour converted to luminance)."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Literal

import numpy as np

from xraycls.errors import ImageReadError, ImageTooLargeError, XrayWarning
from xraycls.io.image import ImageMeta, RawImage, luminance

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load_raster(path: Path, data: bytes, *, max_pixels: int) -> RawImage:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError) as e:
        raise ImageReadError(path, f"cannot open as PNG/JPEG: {e}") from e
    w, h = im.size
    if w * h > max_pixels:
        raise ImageTooLargeError(
            path, f"{w}x{h} pixels is over the {max_pixels:,}-pixel guard; refusing to decode"
        )
    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = ImageOps.exif_transpose(im)
            im.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as e:
        reason = "truncated" if "truncated" in str(e).lower() else "corrupt"
        raise ImageReadError(path, f"{reason} {im.format or 'image'} data: {e}") from e

    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(im, dtype=np.float32)
        nominal = (0.0, 65535.0 if float(values.max()) <= 65535 else float(values.max()))
    elif mode in ("L", "1"):
        values = np.asarray(im.convert("L"), dtype=np.float32)
        nominal = (0.0, 255.0)
    else:
        rgb = np.asarray(im.convert("RGB"))
        if not (
            np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])
        ):
            notes.append(f"colour ({mode}) converted to luminance")
        values = luminance(rgb)
        nominal = (0.0, 255.0)
    for note in notes:
        warnings.warn(f"{path}: {note}", XrayWarning, stacklevel=3)
    fmt: Literal["png", "jpeg"] = "png" if data.startswith(_PNG_MAGIC) else "jpeg"
    meta = ImageMeta(
        path=str(path),
        format=fmt,
        original_shape=(h, w),
        photometric="MONOCHROME2",
        bits_stored=16 if nominal[1] > 255 else 8,
        warnings=tuple(notes),
    )
    return RawImage(values=values, meta=meta, nominal_range=nominal)
