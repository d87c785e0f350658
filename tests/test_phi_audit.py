"""PHI audit: identifiers in the DICOM headers never reach a file xraycls writes or a log line.

DICOMs whose PatientName, PatientID, AccessionNumber, birth/study/series/acquisition dates and
institution carry marker strings go through ingest -> train (smoke) -> predict (with CAM overlays)
-> the viewer's JSON report and batch CSV. Every byte written under the work folder and every
line printed or logged is searched for the markers. The only allowed hits are the DICOM
Secondary Captures that ``predict --dicom-out`` writes on request: they must carry the patient to
be filed beside the source study in a PACS (the user explicitly asked for identifiers there).
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import REPO
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from typer.testing import CliRunner

from xraycls.cli import app

MARKERS = {
    "PatientName": "Zyxmarker^Phiname",
    "PatientID": "PHIMARKERID7731",
    "AccessionNumber": "ACCMARKER5519",
    "PatientBirthDate": "19230817",
    "StudyDate": "19610322",
    "SeriesDate": "19610323",
    "AcquisitionDate": "19610324",
    "ContentDate": "19610325",
    "InstitutionName": "Markerville General Hospital",
    "ReferringPhysicianName": "Refmarker^Doctor",
}


def _needles() -> list[bytes]:
    out = []
    for kw, v in MARKERS.items():
        out.append(v.encode())
        if kw.endswith("Name") and "^" in v:
            out += [part.encode() for part in v.split("^")]
        if kw.endswith("Date"):
            out.append(f"{v[:4]}-{v[4:6]}-{v[6:]}".encode())  # ISO-formatted dates too
    return out


def _write_dicoms(root: Path, n: int = 24, size: int = 64) -> Path:
    """Synthetic squares as DICOM CRs with marker identifiers; one patient per two images."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    lines = ["path,label"]
    for i in range(n):
        img = rng.normal(0.35, 0.08, (size, size)).clip(0, 1)
        label = "square" if i % 2 else "plain"
        if label == "square":
            y, x = rng.integers(0, size - size // 4, 2)
            img[y : y + size // 4, x : x + size // 4] = 0.95
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = SecondaryCaptureImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        for kw, v in MARKERS.items():
            setattr(ds, kw, v)
        ds.PatientID = f"{MARKERS['PatientID']}{i // 2:02d}"
        ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = (img * 4095).astype(np.uint16).tobytes()
        name = f"img{i:03d}.dcm"
        ds.save_as(root / name, enforce_file_format=True)
        lines.append(f"{name},{label}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.slow
def test_no_identifier_reaches_any_output_or_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    src = _write_dicoms(tmp_path / "dicoms")
    assert pydicom.dcmread(src / "img000.dcm").PatientName == MARKERS["PatientName"]
    work = tmp_path / "work"
    runner = CliRunner()
    printed: list[str] = []

    def cli(*args: str) -> None:
        res = runner.invoke(app, list(args))
        printed.append(res.output)
        assert res.exit_code == 0, res.output

    ingest_dir = work / "ingest"
    cli("ingest", str(src), "--out", str(ingest_dir), "--labels", str(src / "labels.csv"))
    cli("ingest", str(src), "--out", str(ingest_dir), "--labels", str(src / "labels.csv"))
    manifest = list(csv.DictReader((ingest_dir / "manifest.csv").open()))
    assert all(r["status"] == "ok" and r["patient_id"] for r in manifest)  # pseudonyms
    run = work / "run"
    cli(
        "train",
        "--config",
        str(REPO / "configs" / "smoke.yaml"),
        "--out",
        str(run),
        "--set",
        f"data.labels={ingest_dir / 'manifest.csv'}",
        "--set",
        "model.name=resnet50_test",
        "--set",
        "data.limit=null",
        "--set",
        "augment.enabled=false",
        "--set",
        "data.age_range=null",
    )
    cli(
        "predict",
        str(src),
        "--run",
        str(run),
        "--out",
        str(work / "pred" / "results.csv"),
        "--cam-dir",
        str(work / "cams"),
        "--dicom-out",
        str(work / "sc"),
        "--parquet",
        "--workers",
        "1",
    )

    from xraycls.bundle.summary import summarize_run
    from xraycls.inference.analysis import analyse
    from xraycls.inference.predictor import Predictor
    from xraycls.inference.report import batch_row, build_report, rows_to_csv

    predictor = Predictor.from_run(run, device="cpu")
    a = analyse(predictor, "img001.dcm", (src / "img001.dcm").read_bytes())
    report = build_report(a, summarize_run(run), predictor)
    (work / "report.json").write_text(json.dumps(report, allow_nan=False))
    (work / "batch.csv").write_text(rows_to_csv([batch_row(a, predictor.classes)]))

    needles = _needles()
    written = [p for p in work.rglob("*") if p.is_file()]
    assert len(written) > 30  # the audit looked at a real run's outputs
    hits = {
        str(p.relative_to(work)): [n.decode() for n in needles if n in p.read_bytes()]
        for p in written
    }
    hits = {k: v for k, v in hits.items() if v}
    requested = {k for k in hits if k.startswith("sc/")}  # --dicom-out: asked for, by design
    assert requested, "the Secondary Captures should carry the patient (PACS filing)"
    assert {k: v for k, v in hits.items() if k not in requested} == {}
    logs = "\n".join(printed) + "\n" + "\n".join(r.getMessage() for r in caplog.records)
    assert [n.decode() for n in needles if n in logs.encode()] == []
