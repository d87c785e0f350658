"""Per-image outputs beside the results row: a Grad-CAM overlay PNG and DICOM result objects
(a Comprehensive SR of the findings and a Secondary Capture of the overlay, see
:mod:`xraycls.io.dicom_results`)."""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from xraycls.inference.rows import ScoreError, _one_line
from xraycls.io.dicom_results import Algorithm, Finding, write_results
from xraycls.io.files import write_bytes_atomic
from xraycls.io.preprocess import Letterbox

if TYPE_CHECKING:
    from xraycls.inference.predictor import Prediction, Predictor


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


def findings_of(predictor: Predictor, pred: Prediction) -> list[Finding]:
    """One finding per class: its calibrated probability and whether it is the decision
    (multi-label: whether that finding reaches its own threshold)."""
    if pred.decisions is not None:
        present = [bool(d) for d in pred.decisions]
    else:
        present = [c == pred.predicted for c in predictor.classes]
    return [
        Finding(name=c, probability=float(p), present=d)
        for c, p, d in zip(predictor.classes, pred.probs, present, strict=True)
    ]


def algorithm_of(predictor: Predictor) -> Algorithm:
    """The served model as the DICOM results name it: architecture, xraycls version and a bundle
    id that changes with the bundle's files, the served members and the calibration."""
    from xraycls import __version__
    from xraycls.bundle.format import Bundle

    if predictor.run_dir is None:
        name, ident = "xraycls (in-memory model)", "in-memory"
    else:
        bundle = Bundle.read(predictor.run_dir)
        name = f"xraycls {bundle.model}"
        key = {
            "files": bundle.fingerprint(),
            "members": predictor.configuration,
            "calibration": predictor.calibration_name,
        }
        ident = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Algorithm(
        name=name,
        version=__version__,
        bundle_id=ident,
        threshold=predictor.threshold,
        calibrated=predictor.calibrated,
    )


def _png_bytes(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Explainer:
    """Per-file outputs of one batch's readable files: CAM overlay PNGs (``cam_dir``) and, for
    DICOM inputs, an SR (``<name>.sr.dcm``, its path in the row's ``dicom_path``) and a Secondary
    Capture of the overlay (``<name>.cam.dcm`` beside it) under ``dicom_out``."""

    predictor: Predictor
    root: Path
    method: str
    cam_dir: Path | None
    dicom_out: Path | None
    strict_io: bool = False
    """Let an ``OSError`` writing an output (disk full) propagate instead of recording it in the
    row: the listener retries such a batch rather than record a result it could not deliver."""

    def __post_init__(self) -> None:
        try:
            from xraycls.inference import cam
        except ImportError as e:
            raise ScoreError(
                f"CAM outputs need xraycls.inference.cam, which cannot be imported: {e}"
            ) from e
        if self.method not in cam.CAM_METHODS:
            raise ScoreError(
                f"unknown CAM method {self.method!r}; choose one of {', '.join(cam.CAM_METHODS)}"
            )
        self._cam = cam
        self._algorithm = algorithm_of(self.predictor) if self.dicom_out is not None else None

    def __call__(
        self, items: list[dict], preds: list[Prediction | None], rows: list[dict[str, str]]
    ) -> float:
        """Write the outputs, filling the rows' ``cam_path``/``dicom_path``; returns seconds.

        A failed CAM costs the overlay (``cam_failed`` in the row's error), never the SR: the
        findings are written whenever the prediction exists.
        """
        t0 = time.perf_counter()
        ok = [i for i, p in enumerate(preds) if p is not None and rows[i]["status"] == "ok"]
        if not ok:
            return 0.0
        cams: list[Any] = [None] * len(ok)
        try:
            cams = self._cam.explain_pixels(
                self.predictor,
                [np.asarray(items[i]["pixels"], dtype=np.float32) for i in ok],
                method=self.method,
            )
        except Exception as e:
            for i in ok:
                rows[i]["error"] = _one_line(f"cam_failed: {type(e).__name__}: {e}")
        for i, res in zip(ok, cams, strict=True):
            try:
                self._write_one(items[i], preds[i], res, rows[i])  # type: ignore[arg-type]
            except OSError as e:
                if self.strict_io:
                    raise
                rows[i]["error"] = _one_line(f"cam_failed: {type(e).__name__}: {e}")
            except Exception as e:
                rows[i]["error"] = _one_line(f"cam_failed: {type(e).__name__}: {e}")
        return time.perf_counter() - t0

    def _write_one(
        self, item: dict, pred: Prediction, res: Any | None, row: dict[str, str]
    ) -> None:
        path = Path(item["path"])
        box: Letterbox = item["letterbox"]
        rgb = None
        if res is not None:
            rgb = self._cam.overlay(np.asarray(item["original"]), res.to_original(box))
        if self.cam_dir is not None and rgb is not None:
            target = self.cam_dir / output_name(path, self.root, ".png")
            row["cam_path"] = str(write_bytes_atomic(target, _png_bytes(rgb)))
        if self.dicom_out is not None and item["format"] == "dicom":
            assert self._algorithm is not None
            objs = write_results(
                path,
                findings_of(self.predictor, pred),
                self._algorithm,
                sr_path=self.dicom_out / output_name(path, self.root, ".sr.dcm"),
                sc_path=self.dicom_out / output_name(path, self.root, ".cam.dcm"),
                overlay=rgb,
                lines=[self._summary(pred)],
            )
            row["dicom_path"] = str(objs.sr)

    def _summary(self, pred: Prediction) -> str:
        probs = ", ".join(
            f"P({c})={p:.3f}" for c, p in zip(self.predictor.classes, pred.probs, strict=True)
        )
        thr = "" if pred.threshold is None else f" (threshold {pred.threshold:.3f})"
        return f"{self.method}: {probs}; predicted {pred.predicted}{thr}"
