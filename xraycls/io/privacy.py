"""Privacy: what may be shown about an image, and identifiers only when asked for.

Every other module sees the patient only as a salted pseudonym (``ImageMeta.patient_hash``).
"""

from __future__ import annotations

import io
from typing import Any

from xraycls.io.image import RawImage
from xraycls.io.read import sniff_format

_IDENTIFYING = (
    ("PatientName", "Patient name"),
    ("PatientID", "Patient ID"),
    ("PatientBirthDate", "Birth date"),
)


def safe_header(raw: RawImage) -> dict[str, str]:
    """Non-identifying facts about an image, for display. No name, ID, birth date or UIDs;
    the patient appears only as a salted pseudonym."""
    m = raw.meta
    rows: dict[str, Any] = {
        "Format": m.format.upper(),
        "Size (rows x columns)": f"{m.original_shape[0]} x {m.original_shape[1]}",
        "Modality": m.modality,
        "Body part": m.body_part,
        "View": m.view_position,
        "Photometric": m.photometric,
        "Bits stored": m.bits_stored,
        "Pixel spacing (mm)": (
            f"{m.pixel_spacing[0]:g} x {m.pixel_spacing[1]:g}" if m.pixel_spacing else None
        ),
        "Header window (level/width)": (
            f"{m.header_window[0]:g} / {m.header_window[1]:g}" if m.header_window else None
        ),
        "VOI LUT sequence": "yes" if m.has_voi_lut else None,
        "Patient (pseudonym)": m.patient_hash,
        "Decoder notes": "; ".join(m.warnings) or None,
    }
    return {k: str(v) for k, v in rows.items() if v is not None}


def identifying_fields(data: bytes) -> dict[str, str]:
    """Patient name, ID and birth date from a DICOM file's bytes; only call this when the user
    asked to reveal them. Empty for non-DICOM files or when the elements are absent."""
    import pydicom

    if sniff_format(data[:132]) != "dicom":
        return {}
    try:
        ds = pydicom.dcmread(
            io.BytesIO(data),
            stop_before_pixels=True,
            force=data[128:132] != b"DICM",
            specific_tags=[kw for kw, _ in _IDENTIFYING],
        )
    except Exception:  # a header that cannot be parsed has nothing to reveal
        return {}
    out = {}
    for kw, label in _IDENTIFYING:
        v = ds.get(kw)
        if v is not None and str(v).strip():
            out[label] = str(v).strip()
    return out
