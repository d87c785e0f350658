"""Standard DICOM result objects, written with highdicom: what a PACS shows next to the image.

For each scored image xraycls writes, in the source's study and in one new series per kind:

- a **Comprehensive SR** (TID 1500 Measurement Report): one measurement group per finding
  (class) with its calibrated probability and the decision at the stored operating threshold, the
  algorithm's name, version and bundle id, and a reference to the source image;
- a **Secondary Capture** of the heat map burned onto the image, with a visible
  "RESEARCH USE ONLY" caption (burned in: it cannot be hidden by a viewer setting).

Why a Secondary Capture rather than a grayscale softcopy presentation state: a GSPS can only draw
grayscale graphics and text over the source image, not a colour heat map, and whether a viewer
applies it at all varies; a Secondary Capture is shown by every PACS viewer as it is, and the
caption travels with the pixels.

UIDs are derived from the source instance, the bundle id and the kind of object, so scoring the
same image with the same bundle again (a resend, a restart, the DICOMweb path after the DIMSE one)
produces the same instances, which an archive stores once instead of piling up duplicates.

This module takes plain data (findings, an algorithm description, pixels): it knows no model.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from xraycls.errors import ImageReadError
from xraycls.io.files import write_bytes_atomic

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

SCHEME = "99XRAYCLS"
"""The private coding scheme of xraycls's own concepts (class names, probability, decision)."""
CAPTION = "RESEARCH USE ONLY - not for diagnosis"
SR_SERIES_NUMBER = 9902
SC_SERIES_NUMBER = 9901
IMAGE_MODALITIES = frozenset({"CR", "DX"})
"""Source images that are chest radiographs xraycls scores (by the header's Modality)."""


@dataclass(frozen=True)
class Finding:
    """One class/finding of a result: generic over binary, multi-class and multi-label models."""

    name: str
    probability: float
    """Calibrated probability in [0, 1]."""
    present: bool
    """The decision at the stored operating threshold (binary/multi-label) or the argmax."""


@dataclass(frozen=True)
class Algorithm:
    """What produced a result."""

    name: str
    version: str
    bundle_id: str
    """Identifies the served bundle's files, configuration and calibration."""
    threshold: float | None = None
    calibrated: bool = True


@dataclass(frozen=True)
class ResultObjects:
    """The files written for one source image."""

    sr: Path
    sc: Path | None


def result_uid(*parts: str) -> str:
    """A UID determined by ``parts`` (same inputs, same UID)."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=["xraycls", *parts]))


def read_header(source: str | Path) -> Dataset:
    """The source image's header (no pixels).

    Raises:
        ImageReadError: It cannot be read as DICOM or lacks the study/instance UIDs.
    """
    import pydicom

    try:
        ds = pydicom.dcmread(source, stop_before_pixels=True, force=True)
    except Exception as e:
        raise ImageReadError(source, f"cannot re-read the DICOM header: {e}") from e
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if not ds.get(kw):
            raise ImageReadError(source, f"the header has no {kw}; cannot reference it")
    _repair_age(ds)
    return ds


def _repair_age(ds: Dataset) -> None:
    """Patient's Age is copied into the results; a malformed one (``62`` instead of ``062Y``,
    common in anonymised exports) would make them invalid, so it is fixed or left out."""
    age = str(ds.get("PatientAge", "") or "")
    if not age or re.fullmatch(r"\d{3}[DWMY]", age):
        return
    if re.fullmatch(r"\d{1,3}", age.strip()):
        ds.PatientAge = f"{int(age):03d}Y"
    else:
        del ds.PatientAge


def _concept(value: str, meaning: str) -> object:
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value, scheme_designator=SCHEME, meaning=meaning[:64])


def build_sr(source: Dataset, findings: Sequence[Finding], algorithm: Algorithm) -> Dataset:
    """A Comprehensive SR (TID 1500) of ``findings`` on ``source`` (a header is enough)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if not findings:
        raise ValueError("an SR needs at least one finding")
    algo = hd.sr.AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        parameters=[
            f"bundle={algorithm.bundle_id}",
            "threshold="
            + ("none" if algorithm.threshold is None else f"{algorithm.threshold:.6g}"),
            f"calibrated={'yes' if algorithm.calibrated else 'no'}",
        ],
        family=codes.DCM.ArtificialIntelligence,
    )
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=result_uid("device", algorithm.name),
            name=algorithm.name,
            manufacturer_name="xraycls",
            model_name=algorithm.bundle_id,
        ),
    )
    src_ref = hd.sr.SourceImageForMeasurementGroup.from_source_image(source)
    groups = []
    for f in findings:
        # The class name is the code: the same finding of two bundles is the same concept.
        finding = _concept(f.name.replace("\\", "/"), f.name)
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=result_uid("finding", source.SOPInstanceUID, algorithm.bundle_id, f.name),
                    identifier=f.name[:64],
                ),
                finding_type=finding,
                algorithm_id=algo,
                source_images=[src_ref],
                measurements=[
                    hd.sr.Measurement(
                        name=_concept("PROB", "Calibrated probability"),
                        value=float(f.probability),
                        unit=codes.UCUM.NoUnits,
                        algorithm_id=algo,
                    )
                ],
                qualitative_evaluations=[
                    hd.sr.QualitativeEvaluation(
                        name=_concept("DECISION", "Decision at operating threshold"),
                        value=codes.SCT.Present if f.present else codes.SCT.Absent,
                    )
                ],
            )
        )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray"),
        imaging_measurements=groups,
    )
    uid = result_uid("sr", source.SOPInstanceUID, algorithm.bundle_id)
    sr = hd.sr.ComprehensiveSR(
        evidence=[source],
        content=report[0],
        series_instance_uid=result_uid("sr-series", source.StudyInstanceUID, algorithm.bundle_id),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=uid,
        instance_number=1,
        manufacturer="xraycls",
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=f"{algorithm.name} findings ({CAPTION})"[:64],
    )
    sr.SoftwareVersions = algorithm.version
    return sr


def caption_image(rgb: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """``rgb`` (HxWx3 uint8) with ``lines`` burned in on a black band across its top."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))
    h, w = rgb.shape[:2]
    size = max(10, min(w, h) // 40)
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    draw = ImageDraw.Draw(img)
    pad = max(2, size // 3)
    band = pad + len(lines) * (size + pad)
    draw.rectangle((0, 0, w, min(h, band)), fill=(0, 0, 0))
    for i, line in enumerate(lines):
        draw.text((pad, pad + i * (size + pad)), line, fill=(255, 255, 0), font=font)
    return np.asarray(img)


def build_sc(
    source: Dataset, rgb: np.ndarray, algorithm: Algorithm, *, lines: Sequence[str] = ()
) -> Dataset:
    """A Secondary Capture of ``rgb`` (the overlay at the source's size) with the caption and
    ``lines`` burned in, in a new series of the source's study."""
    import highdicom as hd
    from pydicom.dataset import Dataset as _Dataset
    from pydicom.sequence import Sequence as _Sequence

    pixels = caption_image(rgb, [CAPTION, *lines])
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=result_uid("sc-series", source.StudyInstanceUID, algorithm.bundle_id),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=result_uid("sc", source.SOPInstanceUID, algorithm.bundle_id),
        instance_number=1,
        manufacturer="xraycls",
        # Replaced below by the source's own (the overlay has its geometry); highdicom insists
        # on two valid values here, and many sources have none.
        patient_orientation=("A", "F"),
        series_description=f"{algorithm.name} heat map ({CAPTION})"[:64],
    )
    sc.PatientOrientation = source.get("PatientOrientation", "")
    # Type 2C: the source's laterality, or present and empty (a chest is not a paired part).
    sc.Laterality = source.get("Laterality", source.get("ImageLaterality", ""))
    sc.BurnedInAnnotation = "YES"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.SoftwareVersions = algorithm.version
    sc.DerivationDescription = f"{algorithm.name} class activation map; {CAPTION}"[:1024]
    item = _Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = _Sequence([item])
    if source.get("LossyImageCompression") == "01":
        sc.LossyImageCompression = "01"  # derived from a lossy image: stays marked lossy
    return sc


def encode(ds: Dataset) -> bytes:
    """``ds`` as a DICOM file (preamble, file meta)."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def write_results(
    source: str | Path,
    findings: Sequence[Finding],
    algorithm: Algorithm,
    *,
    sr_path: str | Path,
    sc_path: str | Path | None = None,
    overlay: np.ndarray | None = None,
    lines: Sequence[str] = (),
) -> ResultObjects:
    """Write the SR (and, with ``overlay``, the Secondary Capture) of one source image, each
    atomically.

    Raises:
        ImageReadError: The source's header cannot be read.
    """
    header = read_header(source)
    sc = None
    # highdicom warns about odd patient names *quoting them*: nothing of the patient may reach
    # a log, so its warnings are silenced here (the objects are validated by the tests instead).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if overlay is not None and sc_path is not None:
            sc_ds = build_sc(header, overlay, algorithm, lines=lines)
            sc = write_bytes_atomic(Path(sc_path), encode(sc_ds))
        sr = write_bytes_atomic(Path(sr_path), encode(build_sr(header, findings, algorithm)))
    return ResultObjects(sr=sr, sc=sc)


def read_sr_findings(ds: Dataset) -> dict[str, tuple[float, bool]]:
    """Finding name -> (probability, present) from an SR written by :func:`build_sr`."""
    out: dict[str, tuple[float, bool]] = {}

    def walk(items: Sequence[Dataset]) -> None:
        for item in items:
            if item.get("ValueType") == "CONTAINER" and "ContentSequence" in item:
                name, prob, present = None, None, None
                for child in item.ContentSequence:
                    code = child.ConceptNameCodeSequence[0]
                    if child.ValueType == "CODE" and code.CodeValue == "121071":  # DCM Finding
                        name = child.ConceptCodeSequence[0].CodeMeaning
                    elif code.CodingSchemeDesignator != SCHEME:
                        continue
                    elif child.ValueType == "NUM" and code.CodeValue == "PROB":
                        prob = float(child.MeasuredValueSequence[0].NumericValue)
                    elif child.ValueType == "CODE" and code.CodeValue == "DECISION":
                        present = child.ConceptCodeSequence[0].CodeValue == "52101004"
                if name is not None and prob is not None and present is not None:
                    out[name] = (prob, present)
                walk(item.ContentSequence)

    walk(ds.ContentSequence)
    return out
