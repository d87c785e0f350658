"""The run bundle on disk: what ``xraycls train`` writes and every consumer reads.

A bundle is a folder. Everything that decides a prediction lives in it, never in code defaults:

===============================  ===========================================================
``bundle.json``                  format, backbone, input size, normalisation, preprocessing,
                                 weight files
``labels.json``                  classes (the last is "positive" for binary tasks), label column
``config.yaml``                  the resolved training configuration
``fold{k}/weights.safetensors``  one model per cross-validation fold
``weights.safetensors``          a model refit on all data (``cv.refit``), optional
``oof_predictions.csv``          pooled out-of-fold logits, probabilities and the floor's
``holdout_predictions.csv``      the served models' logits on the calibration holdout: patients
                                 no model of the bundle trained on
``metrics.json``                 per-fold and pooled metrics, intervals, calibration summary
``calibration.json``             per served configuration (fold ensemble, refit): calibrator,
                                 operating threshold and their cross-fitted validation
``calibrations/<name>.json``     site calibrations fitted on a local labelled set (optional)
``intensity_reference.json``     the training images' intensities (out-of-distribution check)
``MODEL_CARD.md``                the human-readable card, generated from the files above
===============================  ===========================================================

:class:`Bundle` is the one reader: it validates the files once and hands out typed values.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from xraycls.io.files import write_json_atomic
from xraycls.io.manifest import write_table
from xraycls.io.ood import IntensityReference
from xraycls.io.preprocess import Preprocessing

FORMAT = 2
"""2: calibration per served configuration, fitted on a holdout no model saw (format 1 fitted
one calibrator on single fold models' out-of-fold logits and applied it to the ensemble)."""
BUNDLE_FILE = "bundle.json"
LABELS_FILE = "labels.json"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
OOF_FILE = "oof_predictions.csv"
HOLDOUT_FILE = "holdout_predictions.csv"
SITE_CALIBRATIONS = "calibrations"
CALIBRATION_FILE = "calibration.json"
INTENSITY_FILE = "intensity_reference.json"
CARD_FILE = "MODEL_CARD.md"
REFIT_WEIGHTS = "weights.safetensors"

Members = Literal["auto", "refit", "folds"]
Task = Literal["multiclass", "multilabel"]
Configuration = Literal["folds", "refit"]


class BundleError(ValueError):
    """A run folder is missing a file or holds an inconsistent one; the message names it."""


@dataclass(frozen=True)
class Bundle:
    """A run bundle's identity and the locations of its parts (see the module docstring)."""

    path: Path
    model: str
    image_size: int
    classes: tuple[str, ...]
    label_column: str
    normalization: tuple[tuple[float, ...], tuple[float, ...]]
    preprocessing: Preprocessing
    fold_weights: tuple[Path, ...]
    refit_weights: Path | None
    xraycls_version: str
    format: int = FORMAT
    age_range: tuple[float, float] | None = None
    """The training population's ages in years, when the training data documents them."""
    task: Task = "multiclass"
    """``multiclass`` (one softmax over ``classes``) or ``multilabel`` (``classes`` are
    findings, one sigmoid each, any number present)."""

    @property
    def multilabel(self) -> bool:
        """Whether the bundle predicts findings (one sigmoid each) rather than one class."""
        return self.task == "multilabel"

    @classmethod
    def read(cls, run_dir: str | Path) -> Bundle:
        """Read and check ``bundle.json`` and ``labels.json``.

        Raises:
            BundleError: A file is missing, unreadable or inconsistent; the message names it.
        """
        run = Path(run_dir)
        meta = _json(run / BUNDLE_FILE)
        labels = _json(run / LABELS_FILE)
        try:
            classes = tuple(str(c) for c in labels["classes"])
            p = meta["preprocessing"]
            window = tuple(p["window"]) if isinstance(p["window"], list) else p["window"]
            prep = Preprocessing(
                image_size=int(p["image_size"]),
                resize=p["resize"],
                window=window,
                percentiles=tuple(p["percentiles"]),
            )
            norm = meta["normalization"]
            bundle = cls(
                path=run,
                model=str(meta["model"]),
                image_size=int(meta["image_size"]),
                classes=classes,
                label_column=str(labels.get("label_column", "label")),
                normalization=(tuple(norm["mean"]), tuple(norm["std"])),
                preprocessing=prep,
                fold_weights=tuple(run / f for f in meta.get("fold_weights", [])),
                refit_weights=run / meta["weights"] if meta.get("weights") else None,
                xraycls_version=str(meta.get("xraycls_version", "?")),
                format=int(meta.get("format", 1)),
                age_range=tuple(ages)
                if (ages := (meta.get("population") or {}).get("age_years"))
                else None,
                task=labels.get("task", "multiclass"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{run}: {BUNDLE_FILE} or {LABELS_FILE} is incomplete ({e})") from e
        if bundle.task not in ("multiclass", "multilabel"):
            raise BundleError(f"{run / LABELS_FILE}: unknown task {bundle.task!r}")
        if len(classes) < (1 if bundle.multilabel else 2):
            raise BundleError(f"{run / LABELS_FILE}: needs at least two classes, has {classes}")
        return bundle

    @property
    def positive(self) -> str | None:
        """The positive class of a binary task (the last class), else None."""
        return self.classes[-1] if len(self.classes) == 2 and not self.multilabel else None

    def weights(self, members: Members = "auto") -> list[Path]:
        """The weight files of a configuration: the refit model, the fold ensemble, or ``auto``
        (the bundle's default, :meth:`default_members`).

        Raises:
            BundleError: The chosen files are missing.
        """
        if members == "auto":
            members = self.default_members()
        if members == "refit":
            files = [self.refit_weights or self.path / REFIT_WEIGHTS]
        else:
            files = list(self.fold_weights)
        missing = [str(f) for f in files if not f.is_file()]
        if not files or missing:
            raise BundleError(
                f"{self.path}: weights missing: {', '.join(missing) or 'none listed'}"
            )
        return files

    def file(self, name: str) -> Path:
        """A file of the bundle by name (it may not exist)."""
        return self.path / name

    def metrics(self) -> dict[str, Any]:
        """``metrics.json`` (empty when absent)."""
        return _json(self.path / METRICS_FILE, missing_ok=True)

    def calibration(self, name: str | None = None) -> dict[str, Any] | None:
        """The bundle's calibration (``calibration.json``) or the site calibration ``name``
        (``calibrations/<name>.json``); None when the bundle has none.

        Raises:
            BundleError: A named site calibration does not exist (the message lists those that
                do), or the file predates the per-configuration format.
        """
        if name in (None, "", "default"):
            path = self.path / CALIBRATION_FILE
            if not path.exists():
                return None
        else:
            path = self.path / SITE_CALIBRATIONS / f"{name}.json"
            if not path.exists():
                known = ", ".join(self.site_calibrations()) or "none"
                raise BundleError(f"{self.path}: no site calibration {name!r} (have: {known})")
        data = _json(path)
        if data.get("format") != FORMAT:
            raise BundleError(
                f"{path}: calibration format {data.get('format', 1)}, fitted on single fold models' "
                "out-of-fold logits; it does not describe the served model. Retrain with this "
                "version, or calibrate on a local labelled set (xraycls calibrate RUN --on CSV)"
            )
        return data

    def site_calibrations(self) -> list[str]:
        """Names of the site calibrations stored in the bundle."""
        folder = self.path / SITE_CALIBRATIONS
        return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []

    def default_members(self) -> Configuration:
        """The configuration the bundle serves by default: the one ``calibration.json`` names,
        else the fold ensemble when it exists, else the refit model."""
        cal = self.calibration() if (self.path / CALIBRATION_FILE).exists() else None
        if cal and cal.get("default") in ("folds", "refit"):
            return cal["default"]
        return "folds" if any(f.is_file() for f in self.fold_weights) else "refit"

    def config_yaml(self) -> str:
        """The resolved training configuration, as saved."""
        try:
            return (self.path / CONFIG_FILE).read_text()
        except OSError as e:
            raise BundleError(f"{self.path / CONFIG_FILE}: unreadable ({e})") from e

    def training_data(self) -> str:
        """The labels file the run was trained on, as the config names it."""
        import yaml

        try:
            cfg = yaml.safe_load(self.config_yaml()) or {}
        except (BundleError, yaml.YAMLError):
            return "?"
        return str((cfg.get("data") or {}).get("labels", "?"))

    def oof(self) -> OutOfFold:
        """The pooled out-of-fold predictions (``oof_predictions.csv``)."""
        return read_oof(self.path, self.classes)

    def intensity_reference(self) -> IntensityReference | None:
        """The stored intensity reference of the training images, or None."""
        path = self.path / INTENSITY_FILE
        if not path.exists():
            return None
        try:
            return IntensityReference.from_dict(_json(path))
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{path}: not an intensity reference ({e})") from e

    def fingerprint(self) -> dict[str, str]:
        """What identifies the served model's files: hashes of the small files, size and mtime of
        every weight file (fold and refit; hashing gigabytes would be slow). A result written
        with one fingerprint must not be mixed with results of another."""
        fp: dict[str, str] = {}
        for name in (CONFIG_FILE, BUNDLE_FILE, LABELS_FILE, CALIBRATION_FILE):
            p = self.path / name
            if p.is_file():
                fp[name] = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
        for p in self._weight_files():
            st = p.stat()
            fp[str(p.relative_to(self.path))] = f"{st.st_size}:{st.st_mtime_ns}"
        return fp

    def stamp(self) -> str:
        """Modification times of the files that decide predictions: a cache key under which a
        retrained or recalibrated bundle is loaded afresh and an unchanged one never is."""
        parts = []
        for p in [self.path / n for n in (BUNDLE_FILE, CONFIG_FILE, CALIBRATION_FILE)] + list(
            self._weight_files()
        ):
            parts.append(f"{p.name}:{p.stat().st_mtime_ns if p.exists() else 0}")
        return "|".join(parts)

    def _weight_files(self) -> Iterator[Path]:
        seen = [*self.fold_weights, *([self.refit_weights] if self.refit_weights else [])]
        yield from (p for p in seen if p.is_file())


@dataclass
class OutOfFold:
    """A run's pooled out-of-fold predictions (``oof_predictions.csv``)."""

    paths: list[str]
    groups: np.ndarray
    labels: np.ndarray
    folds: np.ndarray
    logits: np.ndarray
    classes: list[str]
    floor: np.ndarray | None = None
    """The 32x32 logistic-regression floor's OOF probabilities on the same folds, if stored."""

    def aligned(self, paths: list[str]) -> OutOfFold:
        """These predictions with rows in ``paths`` order (runs may have written them differently)."""
        index = {p: i for i, p in enumerate(self.paths)}
        rows = np.array([index[p] for p in paths])
        return OutOfFold(
            paths=list(paths),
            groups=self.groups[rows],
            labels=self.labels[rows],
            folds=self.folds[rows],
            logits=self.logits[rows],
            classes=self.classes,
            floor=None if self.floor is None else self.floor[rows],
        )


def read_oof(run_dir: str | Path, classes: tuple[str, ...] | list[str] | None = None) -> OutOfFold:
    """Read ``oof_predictions.csv`` of a run (classes from ``labels.json`` unless given).

    Raises:
        BundleError: A file is missing or lacks the logit columns.
    """
    run_dir = Path(run_dir)
    labels_meta = _json(run_dir / LABELS_FILE, missing_ok=True)
    if classes is None:
        classes = labels_meta.get("classes") or []
    classes = list(classes)
    multilabel = labels_meta.get("task") == "multilabel"
    try:
        with (run_dir / OOF_FILE).open(newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise BundleError(f"{run_dir}: not a complete run bundle ({e})") from e
    missing = [f"logit_{c}" for c in classes if rows and f"logit_{c}" not in rows[0]]
    if missing or not rows:
        raise BundleError(f"{run_dir / OOF_FILE}: no rows or no columns {missing}")
    index = {c: i for i, c in enumerate(classes)}
    try:
        return OutOfFold(
            paths=[r["path"] for r in rows],
            groups=np.array([r["patient_id"] for r in rows]),
            labels=read_finding_labels(rows, classes)
            if multilabel
            else np.array([index[r["label"]] for r in rows], dtype=np.int64),
            folds=np.array([int(r["fold"]) for r in rows], dtype=np.int64),
            logits=np.array(
                [[float(r[f"logit_{c}"]) for c in classes] for r in rows], dtype=np.float64
            ),
            classes=classes,
            floor=np.array([[float(r[f"floor_prob_{c}"]) for c in classes] for r in rows])
            if f"floor_prob_{classes[0]}" in rows[0]
            else None,
        )
    except (KeyError, ValueError) as e:
        raise BundleError(f"{run_dir / OOF_FILE}: malformed row ({e})") from e


def write_oof(
    run_dir: Path,
    oof: OutOfFold,
    probs: np.ndarray,
) -> None:
    """Write ``oof_predictions.csv``: identity, label, fold, then probabilities, logits and the
    floor's probabilities per class."""
    classes = oof.classes
    multilabel = oof.labels.ndim == 2
    cols = (
        ["path", "patient_id", "label", "fold"]
        + ([f"label_{c}" for c in classes] if multilabel else [])
        + [f"prob_{c}" for c in classes]
        + [f"logit_{c}" for c in classes]
        + ([f"floor_prob_{c}" for c in classes] if oof.floor is not None else [])
    )
    rows = []
    for i, p in enumerate(oof.paths):
        row: dict[str, Any] = {
            "path": p,
            "patient_id": oof.groups[i],
            "label": _label_text(oof.labels[i], classes),
            "fold": int(oof.folds[i]),
        }
        if multilabel:
            row |= finding_label_cells(oof.labels[i], classes)
        for j, c in enumerate(classes):
            row[f"prob_{c}"] = f"{probs[i, j]:.6f}"
            row[f"logit_{c}"] = f"{oof.logits[i, j]:.6f}"
            if oof.floor is not None:
                row[f"floor_prob_{c}"] = f"{oof.floor[i, j]:.6f}"
        rows.append(row)
    write_table(run_dir / OOF_FILE, rows, cols)


@dataclass
class ServedPredictions:
    """The logits of each served configuration on images none of its models trained on (the
    calibration holdout, or a site's labelled set): what its calibration is fitted on."""

    paths: list[str]
    groups: np.ndarray
    labels: np.ndarray
    classes: list[str]
    logits: dict[str, np.ndarray]
    """Configuration (``folds``: mean logits of the fold ensemble; ``refit``) -> N x C."""
    source: str = "holdout"


def write_served(path: Path, pred: ServedPredictions) -> None:
    """Write served predictions (``holdout_predictions.csv`` or a site's): identity, label, then
    ``logit_<configuration>_<class>`` columns."""
    configs = sorted(pred.logits)
    multilabel = pred.labels.ndim == 2
    cols = (
        ["path", "patient_id", "label"]
        + ([f"label_{c}" for c in pred.classes] if multilabel else [])
        + [f"logit_{k}_{c}" for k in configs for c in pred.classes]
    )
    rows = []
    for i, p in enumerate(pred.paths):
        row: dict[str, Any] = {
            "path": p,
            "patient_id": pred.groups[i],
            "label": _label_text(pred.labels[i], pred.classes),
        }
        if multilabel:
            row |= finding_label_cells(pred.labels[i], pred.classes)
        for k in configs:
            for j, c in enumerate(pred.classes):
                row[f"logit_{k}_{c}"] = f"{pred.logits[k][i, j]:.6f}"
        rows.append(row)
    write_table(path, rows, cols)


def read_served(path: Path, classes: list[str], *, source: str = "holdout") -> ServedPredictions:
    """Read :func:`write_served` output.

    Raises:
        BundleError: Missing file or malformed rows.
    """
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise BundleError(f"{path}: unreadable ({e})") from e
    if not rows:
        raise BundleError(f"{path}: no rows")
    configs = sorted({k.split("_")[1] for k in rows[0] if k.startswith("logit_")})
    index = {c: i for i, c in enumerate(classes)}
    multilabel = f"label_{classes[0]}" in rows[0]
    try:
        return ServedPredictions(
            paths=[r["path"] for r in rows],
            groups=np.array([r["patient_id"] for r in rows]),
            labels=read_finding_labels(rows, classes)
            if multilabel
            else np.array([index[r["label"]] for r in rows], dtype=np.int64),
            classes=list(classes),
            logits={
                k: np.array([[float(r[f"logit_{k}_{c}"]) for c in classes] for r in rows])
                for k in configs
            },
            source=source,
        )
    except (KeyError, ValueError) as e:
        raise BundleError(f"{path}: malformed row ({e})") from e


def write_bundle_meta(
    run_dir: Path,
    *,
    model: str,
    image_size: int,
    classes: list[str],
    label_column: str,
    normalization: tuple[tuple[float, ...], tuple[float, ...]],
    prep: Preprocessing,
    folds: int,
    refit: bool,
    age_range: tuple[float, float] | None = None,
    task: Task = "multiclass",
) -> None:
    """Write ``labels.json`` and ``bundle.json``."""
    from xraycls import __version__

    labels: dict[str, Any] = {
        "classes": classes,
        "label_column": label_column,
        "positive": classes[-1] if len(classes) == 2 and task == "multiclass" else None,
    }
    if task == "multilabel":  # multi-class bundles keep the exact labels.json they had
        labels["task"] = task
    write_json_atomic(run_dir / LABELS_FILE, labels)
    write_json_atomic(
        run_dir / BUNDLE_FILE,
        {
            "format": FORMAT,
            "xraycls_version": __version__,
            "model": model,
            "image_size": image_size,
            "num_classes": len(classes),
            "normalization": {"mean": list(normalization[0]), "std": list(normalization[1])},
            "preprocessing": json.loads(prep.fingerprint()),
            "weights": REFIT_WEIGHTS if refit else None,
            "fold_weights": [f"fold{k}/{REFIT_WEIGHTS}" for k in range(folds)],
            "population": {"age_years": list(age_range) if age_range else None},
        },
    )


def _label_text(label: np.ndarray | np.integer, classes: list[str]) -> str:
    """A row's label as text: the class, or the present findings joined by ``|``."""
    if np.ndim(label) == 0:
        return classes[int(label)]
    return "|".join(c for c, v in zip(classes, label, strict=True) if v == 1)


def finding_label_cells(label: np.ndarray, classes: list[str]) -> dict[str, str]:
    """``label_<finding>`` cells: ``1``, ``0``, or blank when unknown."""
    return {
        f"label_{c}": "" if np.isnan(v) else str(int(v))
        for c, v in zip(classes, label, strict=True)
    }


def read_finding_labels(rows: list[dict[str, str]], classes: list[str]) -> np.ndarray:
    """N x K float labels from ``label_<finding>`` cells (blank -> NaN)."""
    return np.array(
        [
            [float(r[f"label_{c}"]) if r[f"label_{c}"] != "" else np.nan for c in classes]
            for r in rows
        ],
        dtype=np.float64,
    ).reshape(len(rows), len(classes))


def find_bundles(root: str | Path, *, max_depth: int = 4) -> list[Path]:
    """Run bundles (folders with ``bundle.json``, ``config.yaml`` and ``labels.json``) under
    ``root`` or ``root`` itself, sorted by path."""
    root = Path(root)
    if not root.is_dir():
        return []
    found: list[Path] = []

    def walk(d: Path, depth: int) -> None:
        if all((d / f).is_file() for f in (BUNDLE_FILE, CONFIG_FILE, LABELS_FILE)):
            found.append(d)
            return
        if depth >= max_depth:
            return
        try:
            children = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return
        for child in children:
            walk(child, depth + 1)

    walk(root, 0)
    return found


def _json(path: Path, *, missing_ok: bool = False) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        if missing_ok:
            return {}
        raise BundleError(f"{path.parent}: not a complete run bundle (no {path.name})") from e
    except (OSError, ValueError) as e:
        raise BundleError(f"{path}: unreadable ({e})") from e
    if not isinstance(data, dict):
        raise BundleError(f"{path}: expected a JSON object")
    return data
