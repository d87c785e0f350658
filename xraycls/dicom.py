"""Reading radiographs: DICOM (any transfer syntax pydicom's plugins decode), PNG and JPEG.

All DICOM knowledge of the project lives here. The rendering order follows DICOM PS3.4 N.2:
stored values -> Modality LUT (rescale or LUT sequence) -> VOI (LUT sequence or window) ->
MONOCHROME1 inversion -> [0, 1]. Inverting *after* the VOI matters: windowing an inverted image
with the header's centre/width (torchxrayvision's ``read_xray_dcm`` does this) renders nonsense.

Reading is split in two so that the viewer can re-window without decoding again:

* :func:`load_image` decodes a file into a :class:`RawImage` (values in modality units plus
  everything needed to render them);
* :func:`render` turns a :class:`RawImage` into float32 pixels in [0, 1] for a window choice;
* :func:`read_image` does both.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from xraycls.errors import (
    CodecUnavailableError,
    DicomReadError,
    ImageReadError,
    ImageTooLargeError,
    NoPixelDataError,
    NotDicomError,
    PixelDecodeError,
    TruncatedDicomError,
    UnsupportedFormatError,
    XrayWarning,
)

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

DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic", ".ima"})
RASTER_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".jpe"})
IMAGE_SUFFIXES = DICOM_SUFFIXES | RASTER_SUFFIXES

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
# A DICOM data set without the Part 10 preamble starts with a group 0x0008 (or 0x0002) element,
# little- or big-endian. Anything else (an HTML page saved as .dcm) is not DICOM.
_RAW_DICOM_STARTS = (b"\x08\x00", b"\x00\x08", b"\x02\x00", b"\x00\x02")
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


# --------------------------------------------------------------------------- public API


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
    return render(raw, window=window, percentiles=percentiles)


def load_image(
    path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, data: bytes | None = None
) -> RawImage:
    """Decode a file into modality values without choosing a window. See :func:`read_image`."""
    path = Path(path)
    if data is None:
        data = read_bytes(path)
    kind = sniff_format(data[:132])
    if kind == "dicom":
        return _load_dicom(path, data, max_pixels=max_pixels)
    if kind in ("png", "jpeg"):
        return _load_raster(path, data, max_pixels=max_pixels)
    if path.suffix.lower() in DICOM_SUFFIXES:
        what = _describe_content(data[:512])
        raise NotDicomError(
            path, f"not a DICOM file: no 'DICM' marker at byte 128 and no DICOM header ({what})"
        )
    raise UnsupportedFormatError(
        path, f"not a DICOM, PNG or JPEG file ({_describe_content(data[:512])})"
    )


def render(
    raw: RawImage,
    *,
    window: Window = "auto",
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
) -> XrayImage:
    """Map modality values to float32 [0, 1] (bright = dense). See :data:`WindowMode`."""
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
        out = _linear(values, float(lo), float(hi))
        applied = f"percentile {percentiles[0]:g}-{percentiles[1]:g}"
    elif mode == "none":
        lo, hi = raw.nominal_range or (float(valid.min()), float(valid.max()))
        out = _linear(values, lo, hi)
        applied = "nominal range" if raw.nominal_range else "min-max"
    else:
        raise ValueError(f"unknown window {window!r}: use auto, header, none, percentile or (c, w)")

    pixels = out.astype(np.float32, copy=False)  # every branch returned a fresh array in [0, 1]
    if raw.invert:
        np.subtract(np.float32(1.0), pixels, out=pixels)
        applied += ", MONOCHROME1 inverted"
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


def hash_patient_id(patient_id: str, *, salt: bytes | None = None) -> str:
    """A salted, non-reversible pseudonym for a patient ID (HMAC-SHA256, 16 hex characters).

    The salt comes from ``XRAYCLS_SALT`` or a random per-installation file
    (``$XDG_CONFIG_HOME/xraycls/salt``), so hashes are stable on one site and cannot be
    reversed by hashing a list of candidate IDs.
    """
    key = salt if salt is not None else _installation_salt()
    return hmac.new(key, patient_id.strip().encode(), hashlib.sha256).hexdigest()[:16]


# --------------------------------------------------------------------------- DICOM


def _load_dicom(path: Path, data: bytes, *, max_pixels: int) -> RawImage:
    import pydicom
    from pydicom.errors import InvalidDicomError

    has_preamble = data[128:132] == b"DICM"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # pydicom warns about many harmless header quirks
            ds = pydicom.dcmread(io.BytesIO(data), force=not has_preamble)
        hit_eof = any("end of file" in str(w.message).lower() for w in caught)
    except InvalidDicomError as e:
        raise NotDicomError(path, f"not a DICOM file: {e}") from e
    except (EOFError, OSError) as e:
        raise TruncatedDicomError(path, f"file ends inside the DICOM header ({e})") from e
    except Exception as e:  # pydicom raises many types for malformed headers
        raise DicomReadError(path, f"unreadable DICOM header: {type(e).__name__}: {e}") from e

    if hit_eof and "PixelData" not in ds:
        raise TruncatedDicomError(path, "file ends before its data set does (no pixel data read)")
    try:
        return _decode_dataset(path, ds, max_pixels=max_pixels)
    except ImageReadError as e:
        if hit_eof and not isinstance(e, TruncatedDicomError):
            raise TruncatedDicomError(path, f"file ends early; {e.reason}") from e
        raise
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as e:
        raise DicomReadError(path, f"invalid DICOM header: {type(e).__name__}: {e}") from e


def _decode_dataset(path: Path, ds: Any, *, max_pixels: int) -> RawImage:
    from pydicom.pixels import apply_color_lut, apply_modality_lut, pixel_array

    if "PixelData" not in ds:
        sop = _sop_class_name(ds)
        if "Rows" in ds and "Columns" in ds and "DirectoryRecordSequence" not in ds:
            raise TruncatedDicomError(
                path,
                f"the header declares a {ds.Rows}x{ds.Columns} image but there is no Pixel Data "
                "element: the file is probably truncated",
            )
        what = f" ({sop})" if sop else ""
        raise NoPixelDataError(path, f"DICOM object without pixel data{what}: not an image")

    missing = [k for k in ("Rows", "Columns", "BitsAllocated") if ds.get(k) is None]
    if missing:
        raise DicomReadError(
            path, f"pixel data without the required element(s) {', '.join(missing)}"
        )
    _infer_transfer_syntax(ds)
    rows, cols = int(ds.Rows), int(ds.Columns)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    bits_alloc = int(ds.BitsAllocated)
    if rows <= 0 or cols <= 0:
        raise DicomReadError(path, f"invalid image size {rows}x{cols}")
    if rows * cols > max_pixels:
        need = rows * cols * spp * max(1, bits_alloc // 8) / 1024**2
        raise ImageTooLargeError(
            path,
            f"header declares {rows}x{cols} pixels ({need:.0f} MiB per frame), over the "
            f"{max_pixels:,}-pixel guard; refusing to decode",
        )

    notes: list[str] = []
    if frames > 1:
        notes.append(f"multi-frame ({frames} frames): using the first frame")
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = pixel_array(ds, index=0 if frames > 1 else None)
    except Exception as e:  # decoders raise RuntimeError, ValueError, NotImplementedError, ...
        raise _classify_decode_error(path, ts, e) from e

    photometric = str(ds.get("PhotometricInterpretation", "") or "").upper().strip() or None
    padding = None
    invert = False
    voi = None
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        values = _luminance(arr) / float(np.iinfo(arr.dtype).max if arr.dtype.kind == "u" else 1)
        notes.append("palette colour converted to luminance")
    elif arr.ndim == 3 and spp > 1:
        # pydicom has already converted YBR_* to RGB.
        values = _luminance(arr)
        notes.append(f"colour ({photometric}) converted to luminance")
    else:
        arr = _fix_bits_stored(arr, ds, notes)
        padding = _padding_mask(arr, ds)
        values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
        invert = photometric == "MONOCHROME1"
        voi = _header_voi(ds)

    for note in notes:
        warnings.warn(f"{path}: {note}", XrayWarning, stacklevel=3)
    meta = ImageMeta(
        path=str(path),
        format="dicom",
        original_shape=(rows, cols),
        photometric=photometric,
        modality=_str(ds, "Modality"),
        body_part=_str(ds, "BodyPartExamined"),
        view_position=_str(ds, "ViewPosition"),
        sop_instance_uid=_str(ds, "SOPInstanceUID"),
        study_instance_uid=_str(ds, "StudyInstanceUID"),
        patient_hash=hash_patient_id(pid) if (pid := _str(ds, "PatientID")) else None,
        pixel_spacing=_spacing(ds),
        bits_stored=int(ds.get("BitsStored", bits_alloc) or bits_alloc),
        header_window=_first_window(ds),
        has_voi_lut=bool(ds.get("VOILUTSequence")),
        warnings=tuple(notes),
    )
    return RawImage(values=values, meta=meta, padding=padding, invert=invert, voi=voi)


def _infer_transfer_syntax(ds: Any) -> None:
    """A data set without file meta (ACR-NEMA style) has native pixel data in the encoding it
    was read with; tell the decoder so instead of failing on the missing (0002,0010)."""
    from pydicom import uid

    meta = getattr(ds, "file_meta", None)
    if meta is None or meta.get("TransferSyntaxUID") is not None:
        return
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None:
        return
    if implicit:
        meta.TransferSyntaxUID = uid.ImplicitVRLittleEndian
    else:
        meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian if little else uid.ExplicitVRBigEndian


def _classify_decode_error(path: Path, ts: Any, e: Exception) -> ImageReadError:
    msg = " ".join(str(e).split())
    if "less than expected" in msg or "truncat" in msg.lower():
        return TruncatedDicomError(path, f"pixel data is shorter than the header declares ({msg})")
    if ts is None:
        return DicomReadError(path, f"cannot decode pixel data: {msg}")
    name = getattr(ts, "name", str(ts))
    try:
        from pydicom.pixels import get_decoder

        available = get_decoder(ts).is_available
    except NotImplementedError:
        return CodecUnavailableError(
            path, f"pydicom has no decoder for transfer syntax {name} ({ts})"
        )
    if not available:
        return CodecUnavailableError(
            path,
            f"no installed codec decodes {name} ({ts}); install pylibjpeg-libjpeg, "
            "pylibjpeg-openjpeg, pylibjpeg-rle or python-gdcm (`pip install xraycls` pulls them)",
        )
    return PixelDecodeError(path, f"every installed decoder failed on {name} data: {msg}")


def _fix_bits_stored(arr: np.ndarray, ds: Any, notes: list[str]) -> np.ndarray:
    """Mask unsigned values above BitsStored (old overlays in high bits); sign-extend signed."""
    if arr.dtype.kind not in "iu":
        return arr
    nbits = arr.dtype.itemsize * 8
    stored = int(ds.get("BitsStored", nbits) or nbits)
    if stored >= nbits:
        return arr
    if arr.dtype.kind == "u":
        if int(arr.max()) >> stored:
            notes.append(f"values above BitsStored={stored} masked")
            arr = arr & np.array((1 << stored) - 1, dtype=arr.dtype)
        return arr
    lo, hi = -(1 << (stored - 1)), (1 << (stored - 1)) - 1
    if int(arr.min()) < lo or int(arr.max()) > hi:
        shift = nbits - stored
        arr = (arr << shift) >> shift
    return arr


def _padding_mask(arr: np.ndarray, ds: Any) -> np.ndarray | None:
    pad = ds.get("PixelPaddingValue")
    if pad is None or isinstance(pad, bytes):
        return None
    limit = ds.get("PixelPaddingRangeLimit")
    if limit is None or isinstance(limit, bytes):
        mask = arr == pad
    else:
        lo, hi = sorted((int(pad), int(limit)))
        mask = (arr >= lo) & (arr <= hi)
    return mask if mask.any() else None


def _header_voi(ds: Any) -> Any:
    """The header's VOI as ``values -> ([0,1] array, description)``, or None."""
    from pydicom.pixels import apply_voi

    seq = ds.get("VOILUTSequence")
    if seq:
        item = seq[0]
        lut = np.asarray(item.LUTData, dtype=np.float32)
        lo, hi = float(lut.min()), float(lut.max())

        def lut_voi(values: np.ndarray) -> tuple[np.ndarray, str]:
            # Many LUTs declare 16 output bits but use 12: scale by the data's own range.
            # LUT inputs are integers; pydicom warns (rightly) on float input.
            out = np.asarray(apply_voi(np.rint(values).astype(np.int64), ds, index=0), np.float32)
            return _linear(out, lo, hi), "VOI LUT sequence"

        return lut_voi
    win = _first_window(ds)
    if win is None:
        return None
    center, width = win
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()

    def window_voi(values: np.ndarray) -> tuple[np.ndarray, str]:
        suffix = "" if function == "LINEAR" else f" {function}"
        return apply_window(values, center, width, function), f"window {center:g}/{width:g}{suffix}"

    return window_voi


def _first_window(ds: Any) -> tuple[float, float] | None:
    c, w = ds.get("WindowCenter"), ds.get("WindowWidth")
    if c is None or w is None:
        return None
    try:
        c = float(c[0] if _is_multi(c) else c)
        w = float(w[0] if _is_multi(w) else w)
    except (TypeError, ValueError, IndexError):
        return None
    if not (math.isfinite(c) and math.isfinite(w)) or w <= 0:
        return None
    return c, w


def _is_multi(v: Any) -> bool:
    return isinstance(v, Sequence) and not isinstance(v, str | bytes)


def _spacing(ds: Any) -> tuple[float, float] | None:
    for kw in ("PixelSpacing", "ImagerPixelSpacing"):
        v = ds.get(kw)
        if v is not None and _is_multi(v) and len(v) == 2:
            try:
                dy, dx = float(v[0]), float(v[1])
            except (TypeError, ValueError):
                return None
            return (dy, dx) if dy > 0 and dx > 0 else None
    return None


def _str(ds: Any, keyword: str) -> str | None:
    try:
        v = ds.get(keyword)
    except Exception:  # a malformed element must not stop the image from loading
        return None
    if v is None:
        return None
    s = str(v).strip()
    return s or None


def _sop_class_name(ds: Any) -> str | None:
    uid = ds.get("SOPClassUID") or (
        ds.file_meta.get("MediaStorageSOPClassUID") if hasattr(ds, "file_meta") else None
    )
    if "DirectoryRecordSequence" in ds:
        return "DICOMDIR"
    return getattr(uid, "name", None) if uid else None


# --------------------------------------------------------------------------- PNG / JPEG


def _load_raster(path: Path, data: bytes, *, max_pixels: int) -> RawImage:
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
        values = _luminance(rgb)
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


# --------------------------------------------------------------------------- helpers


def _linear(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros(values.shape, np.float32)
    out = values.astype(np.float32, copy=False) - np.float32(lo)
    out *= np.float32(1.0 / (hi - lo))
    return np.clip(out, 0.0, 1.0, out=out)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return (rgb[..., :3].astype(np.float32) @ _LUMA).astype(np.float32)


def read_bytes(path: Path) -> bytes:
    """A file's bytes, with :class:`ImageReadError` for missing, unreadable or huge files."""
    try:
        size = path.stat().st_size
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


_SALT: bytes | None = None


def _installation_salt() -> bytes:
    global _SALT
    if _SALT is not None:
        return _SALT
    env = os.environ.get("XRAYCLS_SALT")
    if env:
        _SALT = env.encode()
        return _SALT
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "xraycls"
    salt_file = base / "salt"
    try:
        if not salt_file.exists():
            # Write then hard-link: creation is atomic and never exposes an empty salt to a
            # concurrent worker process.
            base.mkdir(parents=True, exist_ok=True)
            tmp = base / f".salt.{os.getpid()}"
            tmp.write_bytes(os.urandom(32).hex().encode())
            try:
                os.link(tmp, salt_file)
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
        _SALT = salt_file.read_bytes().strip()
    except OSError as e:  # a read-only home: still pseudonymise, but say it is per-process
        warnings.warn(
            f"cannot store a patient-ID salt in {salt_file} ({e}); set XRAYCLS_SALT so that "
            "patient hashes are stable across runs",
            XrayWarning,
            stacklevel=3,
        )
        _SALT = os.urandom(32)
    return _SALT
