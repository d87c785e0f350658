"""Reading radiographs from files: DICOM (any transfer syntax pydicom's plugins decode), PNG and
JPEG, told apart by their content, not their names.

Reading is split in two so that the viewer can re-window without decoding again:

* :func:`load_image` decodes a file into a :class:`~xraycls.io.image.RawImage` (values in
  modality units plus everything needed to render them);
* :func:`~xraycls.io.image.render` turns it into float32 pixels in [0, 1] for a window choice;
* :func:`read_image` does both.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from xraycls.errors import ImageReadError, ImageTooLargeError, NotDicomError, UnsupportedFormatError
from xraycls.io.dicom import load_dicom
from xraycls.io.image import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_PERCENTILES,
    MAX_FILE_BYTES,
    RawImage,
    Window,
    XrayImage,
    check_values,
    decoding,
    render,
)
from xraycls.io.raster import load_raster

DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic", ".ima"})
RASTER_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".jpe"})
IMAGE_SUFFIXES = DICOM_SUFFIXES | RASTER_SUFFIXES

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
# A DICOM data set without the Part 10 preamble starts with a group 0x0008 (or 0x0002) element,
# little- or big-endian. Anything else (an HTML page saved as .dcm) is not DICOM.
_RAW_DICOM_STARTS = (b"\x08\x00", b"\x00\x08", b"\x02\x00", b"\x00\x02")


def read_image(
    path: str | Path,
    *,
    window: Window = "auto",
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    data: bytes | None = None,
) -> XrayImage:
    """Read a DICOM, PNG or JPEG radiograph and render it to [0, 1].

    Args:
        path: The file. Its content decides the format; the extension only decides whether a
            non-matching file is reported as "not DICOM" or "unsupported format".
        window: See :data:`WindowMode`, or an explicit ``(center, width)``.
        percentiles: Clip limits for ``percentile`` mode.
        max_pixels: Refuse frames larger than this before decoding.
        data: The file's bytes when the caller has already read them (avoids a second read).

    Raises:
        ImageReadError: Any failure; subclasses say which (:class:`NotDicomError`, ...). The
            message names the file and the reason.
    """
    raw = load_image(path, max_pixels=max_pixels, data=data)
    return render(raw, window=window, percentiles=percentiles)  # finite 2-D float32 in [0, 1]


def load_image(
    path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, data: bytes | None = None
) -> RawImage:
    """Decode a file into modality values without choosing a window. See :func:`read_image`.

    Returns only finite 2-D float32 values (:func:`~xraycls.io.image.check_values`); raises only
    :class:`ImageReadError` subclasses, whatever the codec raises.
    """
    path = Path(path)
    if data is None:
        data = read_bytes(path)
    with decoding(path):
        raw = _load(path, data, max_pixels)
    return check_values(raw)


def _load(path: Path, data: bytes, max_pixels: int) -> RawImage:
    kind = sniff_format(data[:132])
    if kind == "dicom":
        return load_dicom(path, data, max_pixels=max_pixels)
    if kind in ("png", "jpeg"):
        return load_raster(path, data, max_pixels=max_pixels)
    if path.suffix.lower() in DICOM_SUFFIXES:
        what = _describe_content(data[:512])
        raise NotDicomError(
            path, f"not a DICOM file: no 'DICM' marker at byte 128 and no DICOM header ({what})"
        )
    raise UnsupportedFormatError(
        path, f"not a DICOM, PNG or JPEG file ({_describe_content(data[:512])})"
    )


def sniff_format(head: bytes) -> Literal["dicom", "png", "jpeg"] | None:
    """The format a file's first 132 bytes announce, or None."""
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(_PNG_MAGIC):
        return "png"
    if head.startswith(_JPEG_MAGIC):
        return "jpeg"
    if head[:2] in _RAW_DICOM_STARTS and len(head) >= 8:
        return "dicom"
    return None


def is_candidate(path: Path) -> bool:
    """Whether a folder scan treats ``path`` as an input: an image extension or image content."""
    if path.name.startswith("."):
        return False
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    try:
        with path.open("rb") as f:
            head = f.read(132)
    except OSError:
        return False
    # Extensionless or oddly named files are inputs only when their content says so, so that
    # READMEs, CSVs and JSON beside a DICOM tree are not reported as broken images.
    return head[128:132] == b"DICM" or head.startswith((_PNG_MAGIC, _JPEG_MAGIC))


def iter_image_files(root: str | Path) -> Iterator[Path]:
    """Recursively yield candidate image files under ``root`` (or ``root`` itself), sorted."""
    root = Path(root)
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.is_file() and is_candidate(p):
                yield p


def read_bytes(path: Path) -> bytes:
    """A file's bytes, with :class:`ImageReadError` for missing, unreadable or huge files."""
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            if stat.S_ISDIR(st.st_mode):
                raise ImageReadError(path, "is a directory")
            kind = _special_kind(st.st_mode)
            raise ImageReadError(path, f"is {kind}, not a regular file; refusing to read it")
        size = st.st_size
        if size > MAX_FILE_BYTES:
            raise ImageTooLargeError(
                path, f"file is {size / 1024**3:.1f} GiB, over the 2 GiB limit"
            )
        return path.read_bytes()
    except ImageReadError:
        raise
    except FileNotFoundError as e:
        raise ImageReadError(path, "file not found") from e
    except IsADirectoryError as e:
        raise ImageReadError(path, "is a directory") from e
    except OSError as e:
        raise ImageReadError(path, f"cannot read file: {e.strerror or e}") from e


def _special_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe: reading it could block forever)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a special file"


def _describe_content(head: bytes) -> str:
    text = head.lstrip()[:64].lower()
    if text.startswith((b"<!doctype html", b"<html")):
        return "it is an HTML page"
    if text.startswith(b"<"):
        return "it looks like XML/HTML text"
    if not head:
        return "the file is empty"
    if len(head) < 132:
        return f"only {len(head)} bytes"
    return f"starts with bytes {head[:8].hex(' ')}"
