"""Files in and out: reading radiographs (DICOM, PNG, JPEG), preprocessing and its cache,
manifests and labels tables, atomic writes, display windowing, privacy and the
out-of-distribution checks. Knows no model."""

from xraycls.io.image import ImageMeta, RawImage, XrayImage, render
from xraycls.io.read import iter_image_files, load_image, read_image

__all__ = [
    "ImageMeta",
    "RawImage",
    "XrayImage",
    "iter_image_files",
    "load_image",
    "read_image",
    "render",
]
