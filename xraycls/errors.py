"""Domain exceptions and warnings.

Every read error names the file and says why, in words a user can act on. Each class carries a
short machine-readable ``code`` that batch tools (``xraycls ingest``, ``xraycls predict``) write
into their ``error`` column, so a manifest can be filtered by failure kind.
"""

from __future__ import annotations

from pathlib import Path


class ImageReadError(Exception):
    """An input file could not be turned into an image."""

    code = "unreadable"

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def short(self) -> str:
        """``code: reason`` without the path, for a manifest's ``error`` column."""
        return f"{self.code}: {self.reason}"


class ImageTooLargeError(ImageReadError):
    """The header declares dimensions whose decoded size exceeds the memory guard."""

    code = "too_large"


class UnsupportedFormatError(ImageReadError):
    """The file is neither DICOM nor a PNG/JPEG raster."""

    code = "unsupported_format"


class DicomReadError(ImageReadError):
    """A DICOM-specific read failure."""

    code = "dicom_error"


class NotDicomError(DicomReadError):
    """The file claims to be DICOM (by extension) but is not a DICOM Part 10 file."""

    code = "not_dicom"


class NoPixelDataError(DicomReadError):
    """A valid DICOM object without an image (RT plan, SR, DICOMDIR, ...)."""

    code = "no_pixel_data"


class CodecUnavailableError(DicomReadError):
    """No installed decoder handles the file's transfer syntax."""

    code = "codec_unavailable"


class TruncatedDicomError(DicomReadError):
    """The file ends before its header or pixel data does."""

    code = "truncated"


class PixelDecodeError(DicomReadError):
    """A decoder exists for the transfer syntax but failed on this file's pixel data."""

    code = "decode_failed"


class XrayWarning(UserWarning):
    """Something about an input was converted or guessed (multi-frame, colour, ...)."""


class ConfigError(ValueError):
    """A configuration value is invalid."""
