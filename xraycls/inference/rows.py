"""One file to one result row: the core that every scoring engine shares.

:func:`load_item` reads and preprocesses a file and never raises for a bad one; :func:`score_items`
turns a batch of items into rows of the results schema (:func:`result_columns`), with the
predictor's calibrated probabilities and decision. The local engine (:mod:`xraycls.inference.scoring`)
and the Ray engine (:mod:`xraycls.inference.ray_engine`) differ only in how items reach it.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from xraycls.errors import ImageReadError
from xraycls.io.isolate import DecodeJournal, DecoderPool, run_journaled
from xraycls.io.ood import OODCriteria
from xraycls.io.preprocess import Preprocessing, preprocess_file

if TYPE_CHECKING:
    from xraycls.inference.predictor import Prediction, Predictor

HEAD_COLUMNS = ["path", "status", "error", "sop_instance_uid"]
TAIL_COLUMNS = [
    "predicted",
    "threshold",
    "ood",
    "ood_reasons",
    "seconds",
    "error_code",
    "size_bytes",
    "mtime_ns",
    "cam_path",
    "dicom_path",
]
"""After the ``prob_<class>`` columns. ``seconds`` is the file's decode time plus its share of
its batch's model (and CAM) time. ``error`` on an ``ok`` row means the prediction is valid but a
CAM or DICOM output could not be written (``cam_failed: ...``). ``ood`` is ``flagged`` when the
header says it is not a frontal chest radiograph or its intensities are far from the training
images' (``ood_reasons`` says which), ``ok`` when neither check objects."""


class ScoreError(Exception):
    """The run cannot start (bad output, settings mismatch, missing optional dependency)."""


def result_columns(classes: list[str], *, multilabel: bool = False) -> list[str]:
    """The results CSV's columns for a model with ``classes``: ``prob_<class>`` each, and for
    a multi-label model ``dec_<finding>`` each (1 at or above the finding's stored threshold,
    else 0); ``predicted`` then holds the present findings joined by ``|`` (or ``No
    Finding``) and ``threshold`` is blank (one per finding, in the bundle)."""
    decisions = [f"dec_{c}" for c in classes] if multilabel else []
    return [*HEAD_COLUMNS, *(f"prob_{c}" for c in classes), *decisions, *TAIL_COLUMNS]


def load_item(
    path: str | Path,
    prep: Preprocessing,
    *,
    keep_original: bool = False,
    ood: OODCriteria | None = None,
) -> dict:
    """Read and preprocess one file into a scoring item; never raises for a bad file.

    Args:
        path: The file.
        prep: The bundle's preprocessing.
        keep_original: Also keep the full-size rendering (for CAM overlays).
        ood: The bundle's out-of-distribution criteria (intensity reference, ages).

    Returns:
        A dict with ``path``, ``pixels`` (float32 size x size, None on error), ``letterbox``,
        ``original`` (the windowed image as uint8 at its own size, only with ``keep_original``),
        ``format``, ``sop_instance_uid``, ``ood`` and ``ood_reasons``, ``error`` and
        ``error_code`` (empty when fine) and ``decode_s``.
    """
    t0 = time.perf_counter()
    item = _empty_item(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # conversions do not change a prediction's validity
            res = preprocess_file(path, prep, keep_rendered=keep_original)
            pixels, box, meta = res.pixels, res.letterbox, res.meta
            if res.rendered is not None:  # CAM overlays are drawn on the full-size rendering
                item["original"] = np.rint(res.rendered * 255.0).astype(np.uint8)
        item |= {"pixels": pixels, "letterbox": box}
        if meta is not None:
            item |= {"format": meta.format, "sop_instance_uid": meta.sop_instance_uid or ""}
        content = box.crop(pixels) if box is not None else pixels
        report = (ood or OODCriteria()).check(meta, content)
        item |= {"ood": "flagged" if report.flagged else "ok", "ood_reasons": report.reasons()}
    except ImageReadError as e:
        item |= {"error": e.short(), "error_code": e.code}
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # a decoder bug (or a native panic) must cost one row, not the run
        item |= {
            "error": f"internal_error: {type(e).__name__}: {e}",
            "error_code": "internal_error",
        }
    item["decode_s"] = time.perf_counter() - t0
    return item


def _empty_item(path: str | Path) -> dict[str, Any]:
    return {
        "path": str(path),
        "pixels": None,
        "letterbox": None,
        "original": None,
        "format": "",
        "sop_instance_uid": "",
        "ood": "",
        "ood_reasons": "",
        "error": "",
        "error_code": "",
    }


def error_item(path: str | Path, error: ImageReadError, seconds: float = 0.0) -> dict[str, Any]:
    """The scoring item of a file whose decoding failed outside :func:`load_item` (its decoder
    process crashed or timed out: :class:`~xraycls.errors.DecoderCrashed`, ...)."""
    return _empty_item(path) | {
        "error": error.short(),
        "error_code": error.code,
        "decode_s": seconds,
    }


def load_items(
    paths: list[str],
    prep: Preprocessing,
    *,
    workers: int,
    keep_original: bool = False,
    ood: OODCriteria | None = None,
    prefetch: int | None = None,
    journal: str | Path | None = None,
) -> Iterator[dict[str, Any]]:
    """:func:`load_item` for many files, as they finish, each decoded in an isolated process.

    With ``workers`` >= 1 a :class:`~xraycls.io.isolate.DecoderPool` decodes, so a file that
    aborts, hangs or exhausts its decoder becomes that file's error item (``decoder_crashed``,
    ``decoder_timeout``) and the others are still decoded. ``workers=0`` decodes in this process
    (no isolation; for debugging and tiny inputs); with a ``journal`` file, a file that was being
    decoded when an earlier run died is then decoded isolated (see
    :class:`~xraycls.io.isolate.DecodeJournal`).
    """
    if workers <= 0:
        if journal is None:
            for p in paths:
                yield load_item(p, prep, keep_original=keep_original, ood=ood)
            return
        log = DecodeJournal(journal)
        kw = {"keep_original": keep_original, "ood": ood}
        for i, out in run_journaled(log, load_item, paths, prep, **kw):
            yield error_item(paths[i], out) if isinstance(out, ImageReadError) else out
        log.close()
        return
    with DecoderPool(workers) as pool:
        outcomes = pool.imap_unordered(
            load_item, paths, prep, keep_original=keep_original, ood=ood, prefetch=prefetch
        )
        for i, out in outcomes:
            yield error_item(paths[i], out) if isinstance(out, ImageReadError) else out


def _fmt(x: float) -> str:
    return f"{float(x):.9g}"


def _one_line(value: object) -> str:
    return str(value).replace("\r", " ").replace("\n", " ")


def make_row(
    item: Mapping[str, Any],
    pred: Prediction | None,
    classes: list[str],
    seconds: float,
    *,
    multilabel: bool = False,
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
        "ood": _one_line(item.get("ood", "")),
        "ood_reasons": _one_line(item.get("ood_reasons", "")),
    }
    for c in classes:
        row[f"prob_{c}"] = ""
        if multilabel:
            row[f"dec_{c}"] = ""
    if pred is not None and not np.all(np.isfinite(pred.probs)):
        row |= {
            "status": "error",
            "error_code": "non_finite",
            "error": "non_finite: the model gave non-finite probabilities (NaN/inf) for this image",
        }
        return row
    if pred is not None:
        for c, p in zip(classes, pred.probs, strict=True):
            row[f"prob_{c}"] = _fmt(p)
        row["predicted"] = _one_line(pred.predicted)
        row["threshold"] = "" if pred.threshold is None else _fmt(pred.threshold)
        if multilabel and pred.decisions is not None:
            for c, d in zip(classes, pred.decisions, strict=True):
                row[f"dec_{c}"] = "1" if d else "0"
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
            it,
            p,
            predictor.classes,
            it.get("decode_s", 0.0) + (share if p is not None else 0.0),
            multilabel=predictor.multilabel,
        )
        for it, p in zip(items, preds, strict=True)
    ]
    return rows, preds
