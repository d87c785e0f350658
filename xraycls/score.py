"""``xraycls predict``: score a file, a folder or a manifest into a resumable results CSV.

Streaming: a torch ``DataLoader`` decodes and preprocesses files in worker processes while this
process runs the model; each batch's rows are appended to the CSV, flushed and fsynced, so a
``kill -9`` at any moment loses at most the batch in flight.

Resuming: a file is skipped when the CSV already has a row for its path made from a file of the
same size and modification time (``size_bytes``, ``mtime_ns`` columns); a changed file is scored
again and its old row replaced, and rows whose error is ``internal_error`` (a bug, possibly
transient) are retried. What decides a row (input, model files, preprocessing, CAM and DICOM
options) is stored beside the CSV in ``<stem>.settings.json``; resuming with other settings is an
error rather than a silent mix of two models' results in one file.

Torn lines: every record ends with a newline and no field other than ``path`` (the first column)
can hold a newline, so a record torn by a kill is recognised on resume: the file is cut after its
last newline and records with the wrong number of fields are dropped. The kept rows are then
written back atomically (which also drops rows of changed or vanished files), and at the end the
whole file is rewritten atomically in input order: a finished CSV is always clean.

Per-file errors: the dataset's ``__getitem__`` turns every exception of reading a file into that
file's error row, so one bad file never kills a worker or stops the batch. A worker killed by the
operating system (a decoder crash, the OOM killer) does stop the run; re-running resumes it.
Workers are spawned, not forked (see :func:`_local_batches`): a script that calls :func:`score`
with workers needs the usual ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import os
import re
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from xraycls.dicom import _installation_salt, iter_image_files, read_image
from xraycls.errors import ImageReadError
from xraycls.fsutil import mkstemp_beside, write_json_atomic
from xraycls.manifest import read_labels, write_table
from xraycls.preprocess import Letterbox, Preprocessing, preprocess_file, resize_to_square

if TYPE_CHECKING:
    # Imported where used: decoding workers unpickle this module's dataset, and importing the
    # predictor (calibration -> scikit-learn) would double each worker's start-up time.
    from xraycls.predict import Prediction, Predictor

Engine = Literal["local", "ray"]
Members = Literal["auto", "refit", "folds"]

HEAD_COLUMNS = ["path", "status", "error", "sop_instance_uid"]
TAIL_COLUMNS = [
    "predicted",
    "threshold",
    "seconds",
    "error_code",
    "size_bytes",
    "mtime_ns",
    "cam_path",
    "dicom_path",
]
"""After the ``prob_<class>`` columns. ``seconds`` is the file's decode time plus its share of
its batch's model (and CAM) time. ``error`` on an ``ok`` row means the prediction is valid but a
CAM or DICOM output could not be written (``cam_failed: ...``)."""

RETRIED_ERRORS = frozenset({"internal_error"})
SETTINGS_VERSION = 1
_INFO_KEYS = frozenset({"run"})
"""Settings recorded for provenance but not compared on resume: a bundle that moved is the same
model when its files (``model.files``) are the same."""


class ScoreError(Exception):
    """The run cannot start (bad output, settings mismatch, missing optional dependency)."""


def result_columns(classes: list[str]) -> list[str]:
    """The results CSV's columns for a model with ``classes``."""
    return [*HEAD_COLUMNS, *(f"prob_{c}" for c in classes), *TAIL_COLUMNS]


# --------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    """The files to score, in order, and the folder their output names are made relative to."""

    paths: list[Path]
    root: Path
    source: Path


def collect_inputs(source: str | Path) -> Inputs:
    """Resolve INPUT: an image file, a folder (recursive, as ``xraycls ingest`` scans it) or a
    CSV with a ``path`` column (a labels CSV or an ingest manifest; relative paths are resolved
    against the CSV's folder).

    Raises:
        FileNotFoundError: ``source`` does not exist.
        PermissionError: ``source`` is a folder that cannot be listed.
        LabelsError: The CSV is malformed.
    """
    src = Path(source).resolve()
    if not src.exists():
        raise FileNotFoundError(f"{source}: no such file or folder")
    if src.is_dir():
        if not os.access(src, os.R_OK | os.X_OK):
            raise PermissionError(f"{source}: folder not readable")
        return Inputs(list(iter_image_files(src)), src, src)
    if src.suffix.lower() == ".csv":
        paths = [Path(r["path"]) for r in read_labels(src)]
        root = Path(os.path.commonpath([str(src.parent), *map(str, paths)]))
        return Inputs(paths, root, src)
    return Inputs([src], src.parent, src)


def output_name(path: Path, root: Path, suffix: str) -> Path:
    """``path`` relative to ``root`` with ``suffix`` appended: distinct inputs get distinct
    names (``a/x.dcm`` and ``b/x.dcm`` -> ``a/x.dcm.png``, ``b/x.dcm.png``)."""
    try:
        rel = path.relative_to(root)
    except ValueError:
        rel = Path(*path.parts[1:]) if path.is_absolute() else path
    if str(rel) in ("", "."):
        rel = Path(path.name)
    # Line breaks become "_": output names must stay single-line in the results CSV, where only
    # the first column (the input path) may hold one (see ResultsFile.read_existing).
    parts = [re.sub(r"[\r\n]", "_", part) for part in rel.with_name(rel.name + suffix).parts]
    return Path(*parts)


def _stat_key(path: Path) -> tuple[str, str]:
    try:
        st = path.stat()
    except OSError:
        return "", ""
    return str(st.st_size), str(st.st_mtime_ns)


# --------------------------------------------------------------------------- decoding


def load_item(path: str | Path, prep: Preprocessing, *, keep_original: bool = False) -> dict:
    """Read and preprocess one file into a scoring item; never raises for a bad file.

    Returns:
        A dict with ``path``, ``pixels`` (float32 size x size, None on error), ``letterbox``,
        ``original`` (the windowed image as uint8 at its own size, only with ``keep_original``),
        ``format``, ``sop_instance_uid``, ``error`` and ``error_code`` (empty when fine) and
        ``decode_s``.
    """
    t0 = time.perf_counter()
    item: dict[str, Any] = {
        "path": str(path),
        "pixels": None,
        "letterbox": None,
        "original": None,
        "format": "",
        "sop_instance_uid": "",
        "error": "",
        "error_code": "",
    }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # conversions do not change a prediction's validity
            if keep_original:
                # preprocess_file without a cache is exactly these two steps; CAM overlays need
                # the full-size rendering that it would discard.
                image = read_image(path, window=prep.window, percentiles=prep.percentiles)
                pixels, box = resize_to_square(image.pixels, prep.image_size, mode=prep.resize)
                item["original"] = np.rint(image.pixels * 255.0).astype(np.uint8)
                meta = image.meta
            else:
                res = preprocess_file(path, prep)
                pixels, box, meta = res.pixels, res.letterbox, res.meta
        item |= {"pixels": pixels, "letterbox": box}
        if meta is not None:
            item |= {"format": meta.format, "sop_instance_uid": meta.sop_instance_uid or ""}
    except ImageReadError as e:
        item |= {"error": e.short(), "error_code": e.code}
    except Exception as e:  # a decoder bug must cost one row, not the run
        item |= {
            "error": f"internal_error: {type(e).__name__}: {e}",
            "error_code": "internal_error",
        }
    item["decode_s"] = time.perf_counter() - t0
    return item


class ScoringDataset(torch.utils.data.Dataset):
    """Files -> scoring items (see :func:`load_item`); a bad file is an item with its error."""

    def __init__(
        self, paths: list[str], prep: Preprocessing, *, keep_original: bool = False
    ) -> None:
        self.paths = paths
        self.prep = prep
        self.keep_original = keep_original

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        item = load_item(self.paths[i], self.prep, keep_original=self.keep_original)
        # Tensors cross from worker processes through shared memory instead of a pickle pipe.
        for k in ("pixels", "original"):
            if item[k] is not None:
                item[k] = torch.from_numpy(item[k])
        return item


def _as_list(batch: list[dict]) -> list[dict]:
    return batch


def _worker_init(_: int) -> None:
    import cv2

    cv2.setNumThreads(1)  # one decoding thread per worker: the workers are the parallelism


def default_workers() -> int:
    """Decoding processes when not given: the CPU count, at most 8."""
    return min(os.cpu_count() or 1, 8)


# --------------------------------------------------------------------------- scoring


def _fmt(x: float) -> str:
    return f"{float(x):.9g}"


def _one_line(value: object) -> str:
    return str(value).replace("\r", " ").replace("\n", " ")


def make_row(
    item: Mapping[str, Any], pred: Prediction | None, classes: list[str], seconds: float
) -> dict[str, str]:
    """The results row of one item (``pred`` None for an item that failed to read)."""
    row = {
        "path": str(item["path"]),
        "status": "ok" if pred is not None else "error",
        "error": _one_line(item.get("error", "")),
        "error_code": _one_line(item.get("error_code", "")),
        "sop_instance_uid": _one_line(item.get("sop_instance_uid", "")),
        "seconds": f"{seconds:.4f}",
        "size_bytes": str(item.get("size_bytes", "")),
        "mtime_ns": str(item.get("mtime_ns", "")),
        "cam_path": "",
        "dicom_path": "",
        "predicted": "",
        "threshold": "",
    }
    for c in classes:
        row[f"prob_{c}"] = ""
    if pred is not None:
        for c, p in zip(classes, pred.probs, strict=True):
            row[f"prob_{c}"] = _fmt(p)
        row["predicted"] = _one_line(pred.predicted)
        row["threshold"] = "" if pred.threshold is None else _fmt(pred.threshold)
    return row


def predict_items(
    predictor: Predictor, items: list[Mapping[str, Any]]
) -> tuple[list[Prediction | None], float]:
    """Predictions for the items that were read (None for the others) and the model seconds."""
    ok = [i for i, it in enumerate(items) if it["pixels"] is not None]
    preds: list[Prediction | None] = [None] * len(items)
    t0 = time.perf_counter()
    pixels = [np.asarray(items[i]["pixels"], dtype=np.float32) for i in ok]
    for i, p in zip(ok, predictor.predict(pixels), strict=True):
        preds[i] = p
    return preds, time.perf_counter() - t0


def score_items(
    predictor: Predictor, items: list[Mapping[str, Any]]
) -> tuple[list[dict[str, str]], list[Prediction | None]]:
    """Rows (and predictions) for one batch of items: the shared core of both engines.

    A model failure (e.g. out of memory) turns the batch's readable files into
    ``internal_error`` rows, which a resumed run retries, instead of stopping the run.
    """
    try:
        preds, model_s = predict_items(predictor, items)
    except Exception as e:
        msg = f"internal_error: the model failed on this file's batch: {type(e).__name__}: {e}"
        items = [
            it if it["pixels"] is None else {**it, "error": msg, "error_code": "internal_error"}
            for it in items
        ]
        preds, model_s = [None] * len(items), 0.0
    share = model_s / max(1, sum(p is not None for p in preds))
    rows = [
        make_row(
            it, p, predictor.classes, it.get("decode_s", 0.0) + (share if p is not None else 0.0)
        )
        for it, p in zip(items, preds, strict=True)
    ]
    return rows, preds


# --------------------------------------------------------------------------- results file


class ResultsFile:
    """The results CSV: resumed with a torn tail cut off, appended per batch, finished atomically."""

    def __init__(self, path: Path, columns: list[str]) -> None:
        self.path = path
        self.columns = columns
        self._f: io.TextIOWrapper | None = None

    def read_existing(self) -> list[dict[str, str]]:
        """The complete rows of an earlier run's file (none when there is no file).

        Raises:
            ScoreError: The file's header is not this model's results header.
        """
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        # A kill can tear only the last record; every complete record ends with a newline.
        text = data[: data.rfind(b"\n") + 1].decode("utf-8", errors="surrogateescape")
        reader = csv.reader(io.StringIO(text, newline=""))
        header = next(reader, None)
        if header is None:
            return []
        if header != self.columns:
            raise ScoreError(
                f"{self.path}: exists with other columns than this model's results "
                f"({', '.join(header[:8])}...); choose another --out"
            )
        n = len(self.columns)
        rows = []
        try:
            for rec in reader:
                if len(rec) == n:
                    rows.append(dict(zip(self.columns, rec, strict=True)))
        except csv.Error:
            pass  # a record torn inside a quoted path: it can only be the last one
        return rows

    def start(self, rows: Iterable[Mapping[str, object]]) -> None:
        """Write ``rows`` atomically (dropping torn or stale records) and open for appending."""
        write_table(self.path, rows, self.columns)
        # surrogateescape: file names that are not UTF-8 (os.walk gives them as surrogates)
        # are written back as their original bytes instead of crashing the run.
        self._f = self.path.open("a", newline="", encoding="utf-8", errors="surrogateescape")

    def append(self, rows: list[dict[str, str]]) -> None:
        """Append whole rows in one write, then flush and fsync."""
        assert self._f is not None, "start() first"
        buf = io.StringIO()
        csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore").writerows(rows)
        self._f.write(buf.getvalue())
        self._f.flush()
        os.fsync(self._f.fileno())

    def finish(self, rows: Iterable[Mapping[str, object]]) -> None:
        """Close and rewrite the file atomically with ``rows`` (input order)."""
        self.close()
        write_table(self.path, rows, self.columns)

    def close(self) -> None:
        """Close the append handle."""
        if self._f is not None:
            self._f.close()
            self._f = None


@contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    lock = out.with_name(f".{out.name}.lock")
    with lock.open("a") as f:
        try:
            # A POSIX record lock, not flock(): forked DataLoader workers do not inherit it, so a
            # killed run's orphaned workers (alive for a few seconds) cannot block the resume.
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raise ScoreError(f"{out}: another xraycls predict is writing this file") from e
        yield  # the lock dies with the process, also on kill -9


def settings_path(out: Path) -> Path:
    """Where the settings of a results CSV are stored."""
    return out.with_name(f"{out.stem}.settings.json")


def _model_fingerprint(run_dir: Path | None) -> dict[str, Any]:
    if run_dir is None:
        return {}
    fp: dict[str, Any] = {}
    for name in ("config.yaml", "bundle.json", "labels.json", "calibration.json"):
        p = run_dir / name
        if p.is_file():
            fp[name] = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
    for p in sorted(run_dir.glob("*.safetensors")):  # weights: size + mtime, hashing is slow
        st = p.stat()
        fp[p.name] = f"{st.st_size}:{st.st_mtime_ns}"
    return fp


def _check_settings(out: Path, settings: dict[str, Any], existing: bool) -> None:
    path = settings_path(out)
    current = json.loads(json.dumps(settings))
    if existing:
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ScoreError(
                f"{out}: exists but was not written by xraycls predict ({path.name} missing or "
                "unreadable); choose another --out"
            ) from e
        differ = sorted(
            k
            for k in current.keys() | stored.keys()
            if k not in _INFO_KEYS and current.get(k) != stored.get(k)
        )
        if differ:
            raise ScoreError(
                f"{out}: was written with other settings ({', '.join(differ)} differ); choose "
                f"another --out, or delete it and {path.name} to score everything again"
            )
    write_json_atomic(path, current)


# --------------------------------------------------------------------------- CAM and DICOM


def _write_bytes_atomic(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = mkstemp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # before the fsynced CSV row that names this file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _png_bytes(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


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
    return _write_bytes_atomic(Path(out), buf.getvalue())


@dataclass
class _Explainer:
    """CAM overlays (PNG and DICOM Secondary Capture) of one batch's readable files."""

    predictor: Predictor
    root: Path
    method: str
    cam_dir: Path | None
    dicom_out: Path | None

    def __post_init__(self) -> None:
        try:
            from xraycls import cam
        except ImportError as e:
            raise ScoreError(f"CAM outputs need xraycls.cam, which cannot be imported: {e}") from e
        if self.method not in cam.CAM_METHODS:
            raise ScoreError(
                f"unknown CAM method {self.method!r}; choose one of {', '.join(cam.CAM_METHODS)}"
            )
        self._cam = cam

    def __call__(
        self, items: list[dict], preds: list[Prediction | None], rows: list[dict[str, str]]
    ) -> float:
        """Write the outputs, filling the rows' ``cam_path``/``dicom_path``; returns seconds."""
        t0 = time.perf_counter()
        ok = [i for i, p in enumerate(preds) if p is not None]
        if not ok:
            return 0.0
        try:
            cams = self._cam.explain_pixels(
                self.predictor,
                [np.asarray(items[i]["pixels"], dtype=np.float32) for i in ok],
                method=self.method,
            )
        except Exception as e:
            for i in ok:
                rows[i]["error"] = _one_line(f"cam_failed: {type(e).__name__}: {e}")
            return time.perf_counter() - t0
        for i, res in zip(ok, cams, strict=True):
            try:
                self._write_one(items[i], preds[i], res, rows[i])  # type: ignore[arg-type]
            except Exception as e:
                rows[i]["error"] = _one_line(f"cam_failed: {type(e).__name__}: {e}")
        return time.perf_counter() - t0

    def _write_one(self, item: dict, pred: Prediction, res: Any, row: dict[str, str]) -> None:
        path = Path(item["path"])
        box: Letterbox = item["letterbox"]
        rgb = self._cam.overlay(np.asarray(item["original"]), res.to_original(box))
        if self.cam_dir is not None:
            target = self.cam_dir / output_name(path, self.root, ".png")
            row["cam_path"] = str(_write_bytes_atomic(target, _png_bytes(rgb)))
        if self.dicom_out is not None and item["format"] == "dicom":
            target = self.dicom_out / output_name(path, self.root, ".cam.dcm")
            row["dicom_path"] = str(
                write_secondary_capture(path, rgb, target, description=self._describe(pred))
            )

    def _describe(self, pred: Prediction) -> str:
        run = self.predictor.run_dir.name if self.predictor.run_dir else "in-memory model"
        probs = ", ".join(
            f"P({c})={p:.3f}" for c, p in zip(self.predictor.classes, pred.probs, strict=True)
        )
        thr = "" if pred.threshold is None else f" at threshold {pred.threshold:.3f}"
        return (
            f"RESEARCH USE ONLY, NOT FOR DIAGNOSIS. {self.method} class activation map by xraycls "
            f"model {run} ({len(self.predictor.models)} member(s)); {probs}; "
            f"predicted {pred.predicted}{thr}."
        )


# --------------------------------------------------------------------------- the run


@dataclass
class ScoreSummary:
    """What a run did."""

    out: Path
    ok: int = 0
    error: int = 0
    skipped: int = 0
    """Files already scored by an earlier run (same path, size and mtime)."""
    errors_by_code: Counter[str] = field(default_factory=Counter)
    cam_failed: int = 0
    seconds: float = 0.0
    """Wall time of the scoring loop (decoding, model, writing; not the model's loading)."""
    parquet: Path | None = None

    @property
    def images_per_s(self) -> float:
        """Files scored per second of the scoring loop."""
        n = self.ok + self.error
        return n / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        """The one-line summary the CLI prints."""
        kinds = ", ".join(
            f"{n} {c}"
            for c, n in sorted(self.errors_by_code.items(), key=lambda kv: (-kv[1], kv[0]))
        )
        parts = [f"{self.ok} ok", f"{self.error} error" + (f" ({kinds})" if kinds else "")]
        parts.append(f"{self.skipped} skipped (already scored)")
        if self.cam_failed:
            parts.append(f"{self.cam_failed} CAM/DICOM outputs failed (see error column)")
        rate = f"{self.images_per_s:.1f} images/s"
        return f"{', '.join(parts)} in {self.seconds:.1f} s ({rate}) -> {self.out}"


def score(
    source: str | Path,
    out: str | Path,
    *,
    run: str | Path | Predictor,
    members: Members = "auto",
    device: str = "auto",
    workers: int | None = None,
    batch_size: int = 16,
    cam_dir: str | Path | None = None,
    cam_method: str = "gradcam",
    dicom_out: str | Path | None = None,
    parquet: bool = False,
    engine: Engine = "local",
    on_progress: Callable[[int, int], None] | None = None,
) -> ScoreSummary:
    """Score every file of ``source`` into the results CSV ``out``, resuming an earlier run.

    Args:
        source: An image file, a folder (scanned recursively) or a CSV with a ``path`` column.
        out: The results CSV (its folder is created).
        run: A run bundle folder, or an already loaded :class:`Predictor` (the Ray engine's
            actors load its ``run_dir`` again, with ``members``).
        members: Which weights of the bundle (see :meth:`Predictor.from_run`).
        device: ``auto``, ``cpu``, ``cuda``, ...
        workers: Decoding processes (default :func:`default_workers`); 0 decodes in this
            process.
        batch_size: Files per model batch (and per flushed write).
        cam_dir: Write a CAM overlay PNG per readable file here (mirroring the input tree).
        cam_method: One of ``xraycls.cam.CAM_METHODS``.
        dicom_out: Write a DICOM Secondary Capture of the overlay per DICOM input here.
        parquet: Also write ``out`` with a ``.parquet`` suffix when the run completes.
        engine: ``local`` (DataLoader) or ``ray`` (Ray Data; needs ``xraycls[distributed]``).
        on_progress: Called with (done, total) after each batch.

    Raises:
        OSError: ``source`` does not exist or cannot be listed; the results cannot be written.
        LabelsError: ``source`` is a malformed CSV.
        BundleError: ``run`` is not a usable run bundle.
        ScoreError: Bad output location, settings mismatch with an earlier run, or a missing
            optional dependency.
    """
    if batch_size < 1:
        raise ScoreError(f"batch size must be at least 1, got {batch_size}")
    inputs = collect_inputs(source)
    out = Path(out).resolve()
    if out.is_dir():
        raise ScoreError(f"--out {out} is a folder; give the results CSV's file name")
    cam_dir = Path(cam_dir).resolve() if cam_dir is not None else None
    dicom_out = Path(dicom_out).resolve() if dicom_out is not None else None
    for name, d in (("--cam-dir", cam_dir), ("--dicom-out", dicom_out)):
        if d is not None and inputs.source.is_dir() and d.is_relative_to(inputs.source):
            raise ScoreError(
                f"{name} {d} lies inside the input {inputs.source}; it would be scored"
            )
    if parquet:
        _require_pyarrow()
    if engine == "ray" and (cam_dir or dicom_out):
        raise ScoreError("--cam-dir and --dicom-out are supported by the local engine only")
    if engine not in ("local", "ray"):
        raise ScoreError(f"unknown engine {engine!r}: use local or ray")

    from xraycls.predict import Predictor

    if isinstance(run, Predictor):
        predictor = run
    else:  # the Ray driver only needs classes and preprocessing: its actors load their own
        predictor = Predictor.from_run(
            run, members=members, device="cpu" if engine == "ray" else device
        )
    explain = None
    if cam_dir is not None or dicom_out is not None:
        explain = _Explainer(predictor, inputs.root, cam_method, cam_dir, dicom_out)

    columns = result_columns(predictor.classes)
    settings = {
        "version": SETTINGS_VERSION,
        "input": str(inputs.source),
        "run": str(predictor.run_dir.resolve()) if predictor.run_dir else None,
        "model": predictor.describe()
        | {"run": None, "files": _model_fingerprint(predictor.run_dir)},
        "preprocessing": predictor.prep.fingerprint(),
        "cam_dir": str(cam_dir) if cam_dir else None,
        "cam_method": cam_method if explain else None,
        "dicom_out": str(dicom_out) if dicom_out else None,
    }
    summary = ScoreSummary(out=out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        results = ResultsFile(out, columns)
        existing = out.exists()
        _check_settings(out, settings, existing)
        previous = {r["path"]: r for r in results.read_existing()}

        rows: dict[str, dict[str, str]] = {}
        todo: list[tuple[str, tuple[str, str]]] = []
        for p in inputs.paths:
            key = _stat_key(p)
            old = previous.get(str(p))
            if (
                old is not None
                and (old["size_bytes"], old["mtime_ns"]) == key
                and old["error_code"] not in RETRIED_ERRORS
            ):
                rows[str(p)] = old
            else:
                todo.append((str(p), key))
        summary.skipped = len(rows)
        results.start(rows.values())
        total, done = len(inputs.paths), len(rows)
        if on_progress:
            on_progress(done, total)

        _installation_salt()  # create the patient-ID salt once, before workers race for it
        t0 = time.perf_counter()
        try:
            if engine == "ray":
                from xraycls.score_ray import ray_batches

                run_dir = predictor.run_dir if isinstance(run, Predictor) else Path(run)
                if run_dir is None:
                    raise ScoreError("--engine ray needs a run folder, not an in-memory model")
                batches = ray_batches(
                    todo,
                    run_dir=run_dir,
                    members=members,
                    prep=predictor.prep,
                    classes=predictor.classes,
                    batch_size=batch_size,
                )
            else:
                batches = _local_batches(
                    todo, predictor, workers=workers, batch_size=batch_size, explain=explain
                )
            for batch_rows in batches:
                results.append(batch_rows)
                for r in batch_rows:
                    rows[r["path"]] = r
                    if r["status"] == "ok":
                        summary.ok += 1
                        summary.cam_failed += r["error"].startswith("cam_failed")
                    else:
                        summary.error += 1
                        summary.errors_by_code[r["error_code"] or "unreadable"] += 1
                done += len(batch_rows)
                if on_progress:
                    on_progress(done, total)
        finally:
            results.close()
        summary.seconds = time.perf_counter() - t0
        missing = [p for p, _ in todo if p not in rows]
        if missing:
            raise RuntimeError(f"{len(missing)} files got no result row, e.g. {missing[0]}")
        results.finish(rows[str(p)] for p in inputs.paths)
        if parquet:
            summary.parquet = write_parquet(out, columns)
    return summary


def _local_batches(
    todo: list[tuple[str, tuple[str, str]]],
    predictor: Predictor,
    *,
    workers: int | None,
    batch_size: int,
    explain: _Explainer | None,
) -> Iterator[list[dict[str, str]]]:
    """Rows per batch: DataLoader workers decode while this process runs the model."""
    if not todo:
        return
    n = default_workers() if workers is None else max(0, workers)
    dataset = ScoringDataset(
        [p for p, _ in todo], predictor.prep, keep_original=explain is not None
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=n,
        collate_fn=_as_list,
        worker_init_fn=_worker_init if n else None,
        prefetch_factor=2 if n else None,
        # Fresh worker processes: a fork inherits the state of this process's thread pools
        # (OpenCV, OpenMP), and a fork taken while one was busy (e.g. after CAM overlays in a
        # long-lived process) deadlocked the child. Costs one interpreter start per worker.
        multiprocessing_context="spawn" if n else None,
    )
    start = 0
    for items in loader:
        for it, (_, (size, mtime)) in zip(items, todo[start : start + len(items)], strict=True):
            it["size_bytes"], it["mtime_ns"] = size, mtime
        start += len(items)
        rows, preds = score_items(predictor, items)
        if explain is not None:
            extra = explain(items, preds, rows) / max(1, sum(p is not None for p in preds))
            for r, p in zip(rows, preds, strict=True):
                if p is not None:
                    r["seconds"] = f"{float(r['seconds']) + extra:.4f}"
        yield rows


# --------------------------------------------------------------------------- parquet


def _require_pyarrow() -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError as e:
        raise ScoreError(
            "--parquet needs pyarrow: pip install pyarrow (or pip install 'xraycls[distributed]')"
        ) from e


def write_parquet(csv_path: Path, columns: list[str]) -> Path:
    """Convert a results CSV to Parquet beside it (atomically): probabilities, threshold and
    seconds as float64 (null on error rows), sizes and mtimes as int64, the rest as strings."""
    _require_pyarrow()
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    numeric = {c: pa.float64() for c in columns if c.startswith("prob_")}
    numeric |= {"threshold": pa.float64(), "seconds": pa.float64()}
    numeric |= {"size_bytes": pa.int64(), "mtime_ns": pa.int64()}
    types = {c: numeric.get(c, pa.string()) for c in columns}
    table = pcsv.read_csv(
        csv_path,
        parse_options=pcsv.ParseOptions(newlines_in_values=True),  # paths may hold line breaks
        convert_options=pcsv.ConvertOptions(
            column_types=types,
            null_values=[""],
            strings_can_be_null=False,
            check_utf8=False,  # file names that are not UTF-8 keep their bytes, as in the CSV
        ),
    )
    target = csv_path.with_suffix(".parquet")
    fd, tmp = mkstemp_beside(target)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
