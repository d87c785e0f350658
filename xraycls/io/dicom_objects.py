"""DICOM objects that xraycls writes (derived from a source image, in its study)."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np

from xraycls.errors import ImageReadError
from xraycls.io.files import write_bytes_atomic

_PATIENT_KEYWORDS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "OtherPatientIDsSequence",
    "PatientComments",
)
_STUDY_KEYWORDS = (
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
)


def write_secondary_capture(
    source: str | Path, rgb: np.ndarray, out: str | Path, *, description: str
) -> Path:
    """Write ``rgb`` (HxWx3 uint8) as a DICOM Secondary Capture derived from ``source``.

    The new instance joins the source's study (same StudyInstanceUID, patient and study
    attributes copied as they are) in a new series, references the source image
    (ReferencedImageSequence, SourceImageSequence) and carries ``description`` in ImageComments
    and DerivationDescription. Nothing of the patient is logged.

    Raises:
        ImageReadError: The source's header cannot be read.
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    from xraycls import __version__

    try:
        # force: the file was already decoded as DICOM, preamble-less (ACR-NEMA) ones included.
        src = pydicom.dcmread(source, stop_before_pixels=True, force=True)
    except Exception as e:
        raise ImageReadError(source, f"cannot re-read the DICOM header: {e}") from e
    now = time.strftime("%Y%m%d"), time.strftime("%H%M%S")
    ds = Dataset()
    if "SpecificCharacterSet" in src:
        ds.SpecificCharacterSet = src.SpecificCharacterSet
    for kw in (*_PATIENT_KEYWORDS, *_STUDY_KEYWORDS):
        if kw in src:
            ds[kw] = src[kw]
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", *_STUDY_KEYWORDS[:5]):
        if kw not in ds:
            setattr(ds, kw, "")  # type 2 attributes: present, possibly empty
    ds.StudyInstanceUID = src.get("StudyInstanceUID") or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.SeriesNumber = 9901
    ds.SeriesDescription = "xraycls CAM overlay (research use only)"
    ds.InstanceNumber = 1
    ds.ConversionType = "WSD"
    ds.Manufacturer = "xraycls"
    ds.SoftwareVersions = __version__
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.BurnedInAnnotation = "NO"
    ds.PatientOrientation = src.get("PatientOrientation", "")
    ds.ContentDate, ds.ContentTime = now
    ds.InstanceCreationDate, ds.InstanceCreationTime = now
    ds.DateOfSecondaryCapture, ds.TimeOfSecondaryCapture = now
    if src.get("LossyImageCompression") == "01":
        ds.LossyImageCompression = "01"  # derived from a lossy image: stays marked lossy
    ds.DerivationDescription = description[:1024]
    ds.ImageComments = description[:10240]
    ref = Dataset()
    ref.ReferencedSOPClassUID = src.get("SOPClassUID", "")
    ref.ReferencedSOPInstanceUID = src.get("SOPInstanceUID", "")
    ds.ReferencedImageSequence = Sequence([ref])
    source_ref = Dataset()
    source_ref.ReferencedSOPClassUID = ref.ReferencedSOPClassUID
    source_ref.ReferencedSOPInstanceUID = ref.ReferencedSOPInstanceUID
    ds.SourceImageSequence = Sequence([source_ref])

    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.set_pixel_data(
        np.ascontiguousarray(rgb, dtype=np.uint8), "RGB", 8, generate_instance_uid=False
    )
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return write_bytes_atomic(Path(out), buf.getvalue())
