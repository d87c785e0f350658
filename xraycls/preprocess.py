"""Resizing to the model's square input and the on-disk cache of preprocessed images.

The cache stores uint16 ``.npy`` files (2 MiB per 1024² image; ``np.load`` with pickling
disabled) under a key that hashes the file's *content* together with every preprocessing
parameter and :data:`PREPROCESS_VERSION`, so a changed file, window, size or resize mode can never
reuse a stale entry, and a renamed or copied file reuses its entry.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from xraycls.dicom import DEFAULT_PERCENTILES, ImageMeta, Window, read_bytes, read_image
from xraycls.fsutil import mkstemp_beside

PREPROCESS_VERSION = 1
"""Bump when the rendering or resizing code changes what it produces: old cache entries die."""

ResizeMode = Literal["letterbox", "squash"]


@dataclass(frozen=True)
class Preprocessing:
    """Everything that decides the pixels of a preprocessed image."""

    image_size: int = 1024
    resize: ResizeMode = "letterbox"
    window: Window = "auto"
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ValueError(f"image_size must be at least 8, got {self.image_size}")
        if self.resize not in ("letterbox", "squash"):
            raise ValueError(f"resize must be 'letterbox' or 'squash', got {self.resize!r}")

    def fingerprint(self) -> str:
        """A stable string of the parameters (and code version) that produced a cached image."""
        d = asdict(self)
        d["window"] = list(self.window) if isinstance(self.window, tuple) else self.window
        d["percentiles"] = list(self.percentiles)
        d["version"] = PREPROCESS_VERSION
        return json.dumps(d, sort_keys=True)


@dataclass(frozen=True)
class Letterbox:
    """Where the original image sits inside the square output (for mapping CAMs back)."""

    original_shape: tuple[int, int]
    size: int
    scale_y: float
    scale_x: float
    top: int
    left: int
    height: int
    width: int

    @classmethod
    def fit(cls, original_shape: tuple[int, int], size: int, mode: ResizeMode) -> Letterbox:
        """The geometry for an ``original_shape`` image resized to ``size`` with ``mode``."""
        h, w = original_shape
        if mode == "squash":
            return cls(original_shape, size, size / h, size / w, 0, 0, size, size)
        scale = size / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        return cls(original_shape, size, nh / h, nw / w, (size - nh) // 2, (size - nw) // 2, nh, nw)

    def crop(self, square: np.ndarray) -> np.ndarray:
        """The part of a ``size``x``size`` array that covers the original image."""
        return square[self.top : self.top + self.height, self.left : self.left + self.width]


def resize_to_square(
    pixels: np.ndarray, size: int, *, mode: ResizeMode = "letterbox"
) -> tuple[np.ndarray, Letterbox]:
    """Resize a float image to ``size``x``size``: aspect kept with black bars, or squashed.

    Shrinking uses OpenCV's area averaging (antialiased: no moiré from grids or rib edges);
    enlarging (e.g. 224-px sources) uses bilinear interpolation. OpenCV is 5-10x faster than
    Pillow's float path here and is already a dependency (via grad-cam).
    """
    import cv2

    box = Letterbox.fit(pixels.shape[:2], size, mode)
    src = np.ascontiguousarray(pixels, dtype=np.float32)
    if (box.height, box.width) != src.shape[:2]:
        shrinking = box.height * box.width < src.shape[0] * src.shape[1]
        interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        src = cv2.resize(src, (box.width, box.height), interpolation=interp)
    if mode == "squash":
        return np.clip(src, 0.0, 1.0, out=src), box
    out = np.zeros((size, size), np.float32)
    np.clip(src, 0.0, 1.0, out=out[box.top : box.top + box.height, box.left : box.left + box.width])
    return out, box


def to_uint16(pixels: np.ndarray) -> np.ndarray:
    """[0, 1] floats to 0..65535 (rounded), the cache's storage format."""
    scaled = np.multiply(pixels, np.float32(65535.0), dtype=np.float32)
    np.clip(scaled, 0.0, 65535.0, out=scaled)
    return np.rint(scaled, out=scaled).astype(np.uint16)


class ImageCache:
    """Content-addressed store of preprocessed images as uint16 ``.npy`` files."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @staticmethod
    def key(content_sha256: str, prep: Preprocessing) -> str:
        """The entry key for a file's content hash and the preprocessing parameters."""
        return hashlib.sha256(f"{content_sha256}|{prep.fingerprint()}".encode()).hexdigest()

    def path(self, key: str) -> Path:
        """Where an entry lives (whether or not it exists)."""
        return self.root / key[:2] / f"{key}.npy"

    def get_uint16(self, key: str) -> np.ndarray | None:
        """The stored uint16 image (0..65535 for [0, 1]), or None when absent or unreadable.

        Data loaders use this and convert whole batches to float, which halves the bytes that
        cross from worker processes.
        """
        try:
            arr = np.load(self.path(key), allow_pickle=False)
        except (FileNotFoundError, ValueError, OSError, EOFError):
            return None
        return arr if arr.dtype == np.uint16 and arr.ndim == 2 else None

    def get(self, key: str) -> np.ndarray | None:
        """The cached float32 image in [0, 1], or None when absent or unreadable."""
        arr = self.get_uint16(key)
        return None if arr is None else np.multiply(arr, np.float32(1 / 65535), dtype=np.float32)

    def put(self, key: str, pixels: np.ndarray) -> Path:
        """Store a [0, 1] image atomically (write to a temp file, then rename)."""
        p = self.path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        q = to_uint16(pixels)
        fd, tmp = mkstemp_beside(p, suffix=".npy")
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, q, allow_pickle=False)
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return p


@dataclass
class Preprocessed:
    """A preprocessed image and what produced it."""

    pixels: np.ndarray
    """float32 ``size``x``size`` in [0, 1]."""
    meta: ImageMeta | None
    """None when the pixels came from the cache without decoding."""
    letterbox: Letterbox | None
    content_sha256: str
    cache_path: Path | None


def preprocess_file(
    path: str | Path,
    prep: Preprocessing,
    *,
    cache: ImageCache | None = None,
    data: bytes | None = None,
    reuse: bool = True,
) -> Preprocessed:
    """Read, render and resize one file, through the cache when one is given.

    Args:
        path: The image file.
        prep: Preprocessing parameters.
        cache: Where to look up and store the result.
        data: The file's bytes, when the caller already has them.
        reuse: Return a cache hit without decoding (then ``meta`` is None). False decodes anyway,
            for callers that need the metadata, and skips only the cache write.

    Raises:
        ImageReadError: The file cannot be read (the message names it and says why).
    """
    path = Path(path)
    if data is None:
        data = read_bytes(path)
    digest = hashlib.sha256(data).hexdigest()
    key = ImageCache.key(digest, prep)
    if reuse and cache is not None and (hit := cache.get(key)) is not None:
        return Preprocessed(hit, None, None, digest, cache.path(key))
    image = read_image(path, window=prep.window, percentiles=prep.percentiles, data=data)
    pixels, box = resize_to_square(image.pixels, prep.image_size, mode=prep.resize)
    stored = None
    if cache is not None:
        existing = cache.path(key)
        stored = existing if not reuse and existing.is_file() else cache.put(key, pixels)
    return Preprocessed(pixels, image.meta, box, digest, stored)
