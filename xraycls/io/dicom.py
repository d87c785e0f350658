"""DICOM: decoding a data set into modality values, its VOI, and the patient pseudonym.

All DICOM reading knowledge of the project lives here (writing results: :mod:`xraycls.io.dicom_results`).
Values come out after the Modality LUT; the VOI is kept as a callable so that
:func:`xraycls.io.image.render` applies it, then inverts MONOCHROME1 (see :mod:`xraycls.io.image`).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xraycls.errors import (
    CodecUnavailableError,
    DicomReadError,
    ImageReadError,
    ImageTooLargeError,
    InvalidImageError,
    NoPixelDataError,
    NotDicomError,
    PixelDecodeError,
    TruncatedDicomError,
    XrayWarning,
)
from xraycls.io.image import ImageMeta, RawImage, apply_window, linear, luminance


def hash_patient_id(patient_id: str, *, salt: bytes | None = None) -> str:
    """A salted, non-reversible pseudonym for a patient ID (HMAC-SHA256, 16 hex characters).

    The salt comes from ``XRAYCLS_SALT`` or a random per-installation file
    (``$XDG_CONFIG_HOME/xraycls/salt``), so hashes are stable on one site and cannot be
    reversed by hashing a list of candidate IDs.
    """
    key = salt if salt is not None else installation_salt()
    return hmac.new(key, patient_id.strip().encode(), hashlib.sha256).hexdigest()[:16]


# --------------------------------------------------------------------------- DICOM


def load_dicom(path: Path, data: bytes, *, max_pixels: int) -> RawImage:
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
        if sop and "Image Storage" in sop and "DirectoryRecordSequence" not in ds:
            raise TruncatedDicomError(
                path,
                f"the file's SOP class is {sop} but it ends before its Pixel Data element: the "
                "file is probably truncated",
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
    _prefer_safe_decoders()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = pixel_array(ds, index=0 if frames > 1 else None)
    except (KeyboardInterrupt, SystemExit):
        raise
    except MemoryError as e:
        raise ImageTooLargeError(path, "out of memory while decoding the pixel data") from e
    except BaseException as e:  # RuntimeError, ValueError, ... and Rust panics (BaseException)
        raise _classify_decode_error(path, ts, e) from e
    expected = (rows, cols, spp) if spp > 1 else (rows, cols)
    if arr.shape[: len(expected)] != expected and photometric_of(ds) != "PALETTE COLOR":
        raise InvalidImageError(
            path,
            f"decoded pixel data has shape {'x'.join(map(str, arr.shape))}, but the header "
            f"declares Rows={rows}, Columns={cols}, SamplesPerPixel={spp}",
        )

    photometric = photometric_of(ds)
    padding = None
    invert = False
    voi = None
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        values = luminance(arr) / float(np.iinfo(arr.dtype).max if arr.dtype.kind == "u" else 1)
        notes.append("palette colour converted to luminance")
    elif arr.ndim == 3 and spp > 1:
        # pydicom has already converted YBR_* to RGB.
        values = luminance(arr)
        notes.append(f"colour ({photometric}) converted to luminance")
    else:
        arr = _fix_bits_stored(arr, ds, notes)
        padding = _padding_mask(arr, ds)
        values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
        # MONOCHROME1 and a Presentation LUT Shape of INVERSE ask for the same one inversion
        # after the VOI (DX requires INVERSE with MONOCHROME1: it is not applied twice).
        shape = str(ds.get("PresentationLUTShape", "") or "").upper().strip()
        invert = photometric == "MONOCHROME1" or shape == "INVERSE"
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
        patient_age_years=patient_age_years(ds),
        pixel_spacing=_spacing(ds),
        bits_stored=int(ds.get("BitsStored", bits_alloc) or bits_alloc),
        header_window=_first_window(ds),
        has_voi_lut=bool(ds.get("VOILUTSequence")),
        warnings=tuple(notes),
    )
    return RawImage(values=values, meta=meta, padding=padding, invert=invert, voi=voi)


def photometric_of(ds: Any) -> str | None:
    """The data set's PhotometricInterpretation, upper-case, or None."""
    return str(ds.get("PhotometricInterpretation", "") or "").upper().strip() or None


_SAFE_DECODERS = False


def prepare_decoders() -> None:
    """Import pydicom's decoders and their plugins now (a decoder process does this before it
    takes its first file, so that start-up is not counted against that file's time limit)."""
    import pydicom.pixels  # noqa: F401
    from PIL import Image  # noqa: F401

    _prefer_safe_decoders()


def _prefer_safe_decoders() -> None:
    """Drop python-gdcm as a *fallback* decoder.

    pydicom tries every available plugin in turn; when pylibjpeg fails on a malformed stream it
    falls back to python-gdcm, which answers some malformed files (a YBR_FULL_422 JPEG 2000,
    Rows 32768 on JPEG-LS) with a C++ exception that aborts the whole process. gdcm stays only for
    transfer syntaxes that no other installed plugin decodes.
    """
    global _SAFE_DECODERS
    if _SAFE_DECODERS:
        return
    _SAFE_DECODERS = True
    try:
        from pydicom.pixels.decoders.base import _PIXEL_DATA_DECODERS
    except ImportError:
        return
    for entry in _PIXEL_DATA_DECODERS.values():
        decoder = entry[0] if isinstance(entry, tuple) else entry
        try:
            others = [p for p in decoder.available_plugins if p != "gdcm"]
            if "gdcm" in decoder.available_plugins and others:
                decoder.remove_plugin("gdcm")
        except (AttributeError, ValueError):
            continue


_AGE_UNITS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


def patient_age_years(ds: Any) -> float | None:
    """The patient's age in years: PatientAge (``nnnD/W/M/Y``; bare digits read as years, a
    common deviation), else StudyDate minus PatientBirthDate; None when neither is usable."""
    age = _str(ds, "PatientAge")
    if age:
        unit = age[-1].upper() if age[-1].isalpha() else "Y"
        digits = age[:-1] if age[-1].isalpha() else age
        if digits.strip().isdigit() and unit in _AGE_UNITS:
            return int(digits) * _AGE_UNITS[unit]
    born, seen = _str(ds, "PatientBirthDate"), _str(ds, "StudyDate")
    try:
        from datetime import date

        b = date(int(born[:4]), int(born[4:6]), int(born[6:8]))  # type: ignore[index]
        s = date(int(seen[:4]), int(seen[4:6]), int(seen[6:8]))  # type: ignore[index]
    except (TypeError, ValueError):
        return None
    years = (s - b).days / 365.25
    return years if 0 <= years < 130 else None


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


def _classify_decode_error(path: Path, ts: Any, e: BaseException) -> ImageReadError:
    msg = " ".join(str(e).split())
    if not isinstance(e, Exception):  # a native panic: say so
        msg = f"{type(e).__name__}: {msg}"
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

    seq = ds.get("VOILUTSequence")
    if seq:
        lut = np.asarray(seq[0].LUTData, dtype=np.float32)
        lo, hi = float(lut.min()), float(lut.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError("the VOI LUT sequence holds non-finite values")
        # Only what applying the LUT needs, so that the image pickles small (decoder processes).
        from pydicom.dataset import Dataset

        part = Dataset()
        for kw in ("VOILUTSequence", "PixelRepresentation", "BitsStored", "BitsAllocated"):
            if kw in ds:
                setattr(part, kw, ds[kw].value)
        return LutVOI(part, lo, hi)
    win = _first_window(ds)
    if win is None:
        return None
    center, width = win
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    return WindowVOI(center, width, function)


@dataclass(frozen=True)
class WindowVOI:
    """The header's first window as a VOI transform (picklable)."""

    center: float
    width: float
    function: str = "LINEAR"

    def __call__(self, values: np.ndarray) -> tuple[np.ndarray, str]:
        suffix = "" if self.function == "LINEAR" else f" {self.function}"
        out = apply_window(values, self.center, self.width, self.function)
        return out, f"window {self.center:g}/{self.width:g}{suffix}"


@dataclass(frozen=True)
class LutVOI:
    """The header's VOI LUT sequence as a VOI transform (picklable)."""

    ds: Any
    lo: float
    hi: float

    def __call__(self, values: np.ndarray) -> tuple[np.ndarray, str]:
        from pydicom.pixels import apply_voi

        # Many LUTs declare 16 output bits but use 12: scale by the data's own range.
        # LUT inputs are integers; pydicom warns (rightly) on float input.
        ints = np.rint(values).astype(np.int64)
        out = np.asarray(apply_voi(ints, self.ds, index=0), np.float32)
        return linear(out, self.lo, self.hi), "VOI LUT sequence"


def _first_window(ds: Any) -> tuple[float, float] | None:
    c, w = ds.get("WindowCenter"), ds.get("WindowWidth")
    if c is None or w is None:
        return None
    try:
        c = float(c[0] if _is_multi(c) else c)
        w = float(w[0] if _is_multi(w) else w)
    except (TypeError, ValueError, IndexError):
        return None
    # A window outside float32's range (WindowWidth 1e308) would render NaN: ignore it as unusable.
    if not (math.isfinite(c) and math.isfinite(w)) or w <= 0 or max(abs(c), w) > 1e30:
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


_SALT: bytes | None = None


def installation_salt() -> bytes:
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
