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

    def __reduce__(self) -> tuple[type[ImageReadError], tuple[str, str]]:
        # Errors cross from isolated decoder processes: pickle (path, reason), not the message.
        return (type(self), (self.path, self.reason))


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


class InvalidImageError(ImageReadError):
    """The decoder returned something that is not an image: non-finite values (a NaN rescale
    slope, a 1e308 window) or not a 2-D array (Rows/Columns disagreeing with the pixel data)."""

    code = "invalid_image"


class DecoderCrashed(ImageReadError):
    """The decoder process died on this file (a native abort, a segfault, a Rust panic that could
    not be caught, or the memory cap). Only this file is lost; it is not decoded again."""

    code = "decoder_crashed"


class DecoderTimeout(ImageReadError):
    """Decoding this file took longer than the per-file wall-clock limit (a hang, a read that
    blocks); the decoder was killed and replaced."""

    code = "decoder_timeout"


class XrayWarning(UserWarning):
    """Something about an input was converted or guessed (multi-frame, colour, ...)."""


class OutputError(OSError):
    """An output location cannot be created or written (read-only, a file in the way, disk
    full). The message names the option or file and the fix, in one line."""


class ConfigError(ValueError):
    """A configuration value is invalid."""
