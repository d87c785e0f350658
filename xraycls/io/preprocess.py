"""Resizing to the model's square input and the on-disk cache of preprocessed images.

The cache stores uint16 ``.npy`` files (2 MiB per 1024² image; ``np.load`` with pickling
disabled) under a key that hashes the file's *content* together with every preprocessing
parameter and :data:`PREPROCESS_VERSION`, so a changed file, window, size or resize mode can never
reuse a stale entry, and a renamed or copied file reuses its entry.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from xraycls.io.files import atomic_open
from xraycls.io.image import DEFAULT_PERCENTILES, ImageMeta, RawImage, Window, XrayImage, render
from xraycls.io.read import load_image, read_bytes

PREPROCESS_VERSION = 2
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


def from_uint16(stored: np.ndarray) -> np.ndarray:
    """0..65535 back to float32 [0, 1]: the inverse of :func:`to_uint16` on its grid."""
    return np.multiply(stored, np.float32(1.0 / 65535.0), dtype=np.float32)


def prepare(raw: RawImage, prep: Preprocessing) -> tuple[np.ndarray, Letterbox, XrayImage]:
    """The one path from a decoded image to a model input, for training, scoring and the viewer.

    Renders ``raw`` with the preprocessing's window, resizes it to the square input and puts the
    values on the cache's uint16 grid, so that an image read from the cache and one decoded
    afresh are bit-identical model inputs.

    Returns:
        ``(pixels, letterbox, rendered)``: the ``size`` x ``size`` float32 input in [0, 1], where
        the original sits in it, and the full-size rendering (for overlays).
    """
    rendered = render(raw, window=prep.window, percentiles=prep.percentiles)
    pixels, box = resize_to_square(rendered.pixels, prep.image_size, mode=prep.resize)
    return from_uint16(to_uint16(pixels)), box, rendered


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

    def get(self, key: str) -> np.ndarray | None:
        """The cached float32 image in [0, 1], or None when absent or unreadable."""
        return read_cached(self.path(key))

    def put(self, key: str, pixels: np.ndarray) -> Path:
        """Store a [0, 1] image atomically (write to a temp file, then rename)."""
        p = self.path(key)
        with atomic_open(p, "wb") as f:
            np.save(f, to_uint16(pixels), allow_pickle=False)
        return p


def read_cached(path: str | Path) -> np.ndarray | None:
    """A cache entry (``ImageCache`` or an ingest manifest's ``cache_path``) as float32 [0, 1],
    or None when it is absent, unreadable or not a 2-D uint16 array."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (FileNotFoundError, ValueError, OSError, EOFError):
        return None
    return from_uint16(arr) if arr.dtype == np.uint16 and arr.ndim == 2 else None


@dataclass
class Preprocessed:
    """A preprocessed image and what produced it."""

    pixels: np.ndarray
    """float32 ``size``x``size`` in [0, 1] (see :func:`prepare`)."""
    meta: ImageMeta | None
    """None when the pixels came from the cache without decoding."""
    letterbox: Letterbox | None
    content_sha256: str
    cache_path: Path | None
    rendered: np.ndarray | None = None
    """The full-size rendering in [0, 1], when asked for with ``keep_rendered``."""


def preprocess_file(
    path: str | Path,
    prep: Preprocessing,
    *,
    cache: ImageCache | None = None,
    data: bytes | None = None,
    reuse: bool = True,
    keep_rendered: bool = False,
) -> Preprocessed:
    """Read, render and resize one file (:func:`prepare`), through the cache when one is given.

    Args:
        path: The image file.
        prep: Preprocessing parameters.
        cache: Where to look up and store the result.
        data: The file's bytes, when the caller already has them.
        reuse: Return a cache hit without decoding (then ``meta`` is None). False decodes anyway,
            for callers that need the metadata, and skips only the cache write.
        keep_rendered: Also return the full-size rendering (decodes even on a cache hit).

    Raises:
        ImageReadError: The file cannot be read (the message names it and says why).
    """
    path = Path(path)
    if data is None:
        data = read_bytes(path)
    digest = hashlib.sha256(data).hexdigest()
    key = ImageCache.key(digest, prep)
    if reuse and not keep_rendered and cache is not None and (hit := cache.get(key)) is not None:
        return Preprocessed(hit, None, None, digest, cache.path(key))
    pixels, box, rendered = prepare(load_image(path, data=data), prep)
    stored = None
    if cache is not None:
        existing = cache.path(key)
        stored = existing if not reuse and existing.is_file() else cache.put(key, pixels)
    return Preprocessed(
        pixels, rendered.meta, box, digest, stored, rendered.pixels if keep_rendered else None
    )


def check_file(path: str | Path, prep: Preprocessing, cache: ImageCache | None = None) -> str:
    """Decode and preprocess one file (filling ``cache``) and return its content hash, without
    handing the pixels back: the check that a decoder process runs for training's preflight.

    Raises:
        ImageReadError: The file cannot be read.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return preprocess_file(path, prep, cache=cache).content_sha256
