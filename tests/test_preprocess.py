"""Letterbox resizing and the content-addressed cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import pkg_file

from xraycls.io.preprocess import (
    ImageCache,
    Letterbox,
    Preprocessing,
    preprocess_file,
    resize_to_square,
)


def test_letterbox_keeps_aspect_and_centres() -> None:
    img = np.ones((200, 100), np.float32)
    out, box = resize_to_square(img, 64)
    assert out.shape == (64, 64)
    assert (box.height, box.width, box.top, box.left) == (64, 32, 0, 16)
    assert np.all(out[:, :16] == 0) and np.all(out[:, 48:] == 0)
    assert np.allclose(box.crop(out), 1.0)


def test_squash_fills_the_square() -> None:
    img = np.ones((200, 100), np.float32)
    out, box = resize_to_square(img, 64, mode="squash")
    assert out.shape == (64, 64) and np.allclose(out, 1.0)
    assert (box.scale_y, box.scale_x) == (64 / 200, 64 / 100)


def test_downsampling_is_antialiased() -> None:
    # A one-pixel checkerboard shrunk 8x must become flat grey; point sampling would alias it
    # to all-black or all-white.
    checker = (np.indices((512, 512)).sum(0) % 2).astype(np.float32)
    out, _ = resize_to_square(checker, 64)
    assert abs(out.mean() - 0.5) < 0.01 and out.std() < 0.02


def test_upsampling_224_to_1024_is_smooth_and_in_range() -> None:
    rng = np.random.default_rng(0)
    img = rng.random((224, 224), dtype=np.float32)
    out, box = resize_to_square(img, 1024)
    assert out.shape == (1024, 1024) and box.height == box.width == 1024
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_letterbox_geometry_for_wide_image() -> None:
    box = Letterbox.fit((1000, 2000), 512, "letterbox")
    assert (box.height, box.width, box.top, box.left) == (256, 512, 128, 0)


def test_cache_roundtrip_and_keys(tmp_path: Path) -> None:
    cache = ImageCache(tmp_path / "cache")
    prep = Preprocessing(image_size=64)
    key = ImageCache.key("abc", prep)
    pixels = np.random.default_rng(1).random((64, 64), dtype=np.float32)
    path = cache.put(key, pixels)
    assert path.suffix == ".npy" and np.load(path).dtype == np.uint16
    back = cache.get(key)
    assert back is not None and np.abs(back - pixels).max() <= 0.5 / 65535 + 1e-7
    assert not list(path.parent.glob(".tmp-*"))  # atomic write left no temp file
    # Every parameter and the content take part in the key.
    others = [
        ImageCache.key("abd", prep),
        ImageCache.key("abc", Preprocessing(image_size=128)),
        ImageCache.key("abc", Preprocessing(image_size=64, resize="squash")),
        ImageCache.key("abc", Preprocessing(image_size=64, window="none")),
        ImageCache.key("abc", Preprocessing(image_size=64, window=(40.0, 400.0))),
        ImageCache.key("abc", Preprocessing(image_size=64, percentiles=(1.0, 99.0))),
    ]
    assert len({key, *others}) == len(others) + 1
    assert cache.get(ImageCache.key("zzz", prep)) is None


def test_preprocess_file_uses_cache_and_never_reuses_stale_entries(tmp_path: Path) -> None:
    src = pkg_file("CT_small.dcm")
    cache = ImageCache(tmp_path)
    first = preprocess_file(src, Preprocessing(image_size=64), cache=cache)
    assert first.meta is not None and first.cache_path is not None
    hit = preprocess_file(src, Preprocessing(image_size=64), cache=cache)
    assert hit.meta is None and hit.cache_path == first.cache_path  # served from the cache
    assert np.abs(hit.pixels - first.pixels).max() < 1e-4
    other = preprocess_file(src, Preprocessing(image_size=64, window=(40.0, 400.0)), cache=cache)
    assert other.meta is not None and other.cache_path != first.cache_path
    assert not np.allclose(other.pixels, first.pixels)


def test_corrupt_cache_entry_is_recomputed(tmp_path: Path) -> None:
    src = pkg_file("CT_small.dcm")
    cache = ImageCache(tmp_path)
    first = preprocess_file(src, Preprocessing(image_size=32), cache=cache)
    assert first.cache_path is not None
    first.cache_path.write_bytes(b"garbage")
    again = preprocess_file(src, Preprocessing(image_size=32), cache=cache)
    assert again.meta is not None  # decoded, not served from the broken entry
    assert np.allclose(again.pixels, first.pixels, atol=1e-4)


def test_invalid_preprocessing() -> None:
    with pytest.raises(ValueError, match="resize"):
        Preprocessing(resize="crop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="image_size"):
        Preprocessing(image_size=0)
