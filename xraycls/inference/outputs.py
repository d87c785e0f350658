"""Per-image outputs beside the results row: a Grad-CAM overlay PNG and a DICOM object."""

from __future__ import annotations

import io
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from xraycls.inference.rows import ScoreError, _one_line
from xraycls.io.dicom_objects import write_secondary_capture
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


def _png_bytes(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Explainer:
    """CAM overlays (PNG and DICOM Secondary Capture) of one batch's readable files."""

    predictor: Predictor
    root: Path
    method: str
    cam_dir: Path | None
    dicom_out: Path | None

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
            row["cam_path"] = str(write_bytes_atomic(target, _png_bytes(rgb)))
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
            f"model {run} ({self.predictor.n_members} member(s)); {probs}; "
            f"predicted {pred.predicted}{thr}."
        )
