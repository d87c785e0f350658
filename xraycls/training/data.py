"""From a labels CSV (or an ingest manifest) to model-ready tensors.

Samples are dicts with fixed keys (``image``, ``label``, ``index``); the image is 3xHxW float32,
the grey channel repeated three times and normalised with the statistics the backbone's
pretrained checkpoints were trained with (:func:`xraycls.models.weights.to_model_input`, the
same function the predictor uses).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from xraycls.errors import ConfigError, ImageReadError
from xraycls.evaluation.splits import grouped_subset
from xraycls.io.isolate import DecoderPool
from xraycls.io.manifest import LabelsError, read_labels
from xraycls.io.preprocess import (
    ImageCache,
    Preprocessing,
    check_file,
    preprocess_file,
    read_cached,
)
from xraycls.models.weights import Normalization, to_model_input
from xraycls.training.config import NO_FINDING, AugmentConfig, DataConfig


@dataclass
class Table:
    """The images of an experiment: paths, labels, patient groups.

    Multi-class: ``labels`` holds N integers in ``range(len(classes))``. Multi-label:
    ``classes`` are the findings and ``labels`` is N x K float32, 1/0 for present/absent and
    NaN where the label is unknown (masked out of the loss and the metrics).
    """

    paths: list[str]
    labels: np.ndarray
    groups: np.ndarray
    classes: list[str]
    cached: list[str | None] = field(default_factory=list)
    """Per image, an ingest cache entry usable as is (same preprocessing), else None."""
    teacher_logits: np.ndarray | None = None
    """``N x C`` logits of a teacher per image (distillation), else None."""

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def multilabel(self) -> bool:
        """Whether ``labels`` is a findings matrix (one sigmoid per finding)."""
        return self.labels.ndim == 2

    def subset(self, idx: np.ndarray) -> Table:
        """The rows at ``idx``."""
        return Table(
            [self.paths[i] for i in idx],
            self.labels[idx],
            self.groups[idx],
            self.classes,
            [self.cached[i] for i in idx] if self.cached else [],
            None if self.teacher_logits is None else self.teacher_logits[idx],
        )

    def with_teacher(self, logits: np.ndarray | None) -> Table:
        """This table with ``teacher_logits`` replaced (one row per image)."""
        if logits is not None and len(logits) != len(self):
            raise ValueError(f"{len(logits)} teacher logit rows for {len(self)} images")
        return Table(self.paths, self.labels, self.groups, self.classes, self.cached, logits)


def load_table(
    cfg: DataConfig,
    prep: Preprocessing,
    *,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> Table:
    """Read the labels CSV or manifest named by ``cfg.labels``.

    Manifest rows whose ``status`` is not ``ok`` and rows without a label are excluded, counted
    and reported through ``log``. When the patient column exists, every row must name a
    patient; without the column each image is its own group (with a warning: images of one
    patient may then fall in different folds).

    Raises:
        ConfigError: The file or the label column is missing, a row has no patient id, a label
            is not among ``data.classes``, a declared class has no image, or fewer than two
            classes remain. The message names the file (and line) and the fix.
    """
    try:
        rows = read_labels(cfg.labels)
    except LabelsError as e:
        raise ConfigError(f"data.labels: {e}") from e
    if not rows:
        raise ConfigError(f"{cfg.labels}: no rows")
    if cfg.task == "multilabel":
        return _load_multilabel(cfg, rows, prep, seed=seed, log=log)
    column = cfg.label_column
    if column not in rows[0]:
        raise ConfigError(
            f"{cfg.labels}: no column {column!r} (data.label_column); columns: {', '.join(rows[0])}"
        )
    not_ok = sum(1 for r in rows if r.get("status", "ok") != "ok")
    unlabelled = [i for i, r in enumerate(rows) if r.get("status", "ok") == "ok" and not r[column]]
    if (not_ok or unlabelled) and log is not None:
        log(
            f"{cfg.labels}: excluded {len(unlabelled)} row(s) with an empty {column!r}"
            + (f" (first at line {unlabelled[0] + 2})" if unlabelled else "")
            + (f" and {not_ok} ingest error row(s)" if not_ok else "")
        )
    lines = [i + 2 for i, r in enumerate(rows) if r.get("status", "ok") == "ok" and r[column]]
    rows = [r for r in rows if r.get("status", "ok") == "ok" and r[column]]
    classes = _classes(cfg, rows)
    groups = _patient_groups(cfg, rows, lines)
    index = {c: i for i, c in enumerate(classes)}
    table = Table(
        paths=[r["path"] for r in rows],
        labels=np.array([index[r[column]] for r in rows], dtype=np.int64),
        groups=groups,
        classes=classes,
        cached=_usable_cache_entries(cfg.labels, rows, prep),
    )
    if cfg.limit is not None and cfg.limit < len(table):
        table = table.subset(grouped_subset(table.labels, table.groups, n=cfg.limit, seed=seed))
    return table


_POSITIVE = {"1", "1.0", "true", "yes"}
_NEGATIVE = {"0", "0.0", "false", "no"}
_UNKNOWN = {"", "-1", "-1.0", "nan", "na", "uncertain"}


def _load_multilabel(
    cfg: DataConfig,
    rows: list[dict[str, str]],
    prep: Preprocessing,
    *,
    seed: int,
    log: Callable[[str], None] | None,
) -> Table:
    """The multi-label reading of ``load_table`` (see :class:`Table`)."""
    ok = [(i + 2, r) for i, r in enumerate(rows) if r.get("status", "ok") == "ok"]
    not_ok = len(rows) - len(ok)
    if cfg.label_columns is not None:
        findings, y, skipped = _from_columns(cfg, ok)
    else:
        findings, y, skipped = _from_separated(cfg, ok, log)
    if (not_ok or skipped) and log is not None:
        log(
            f"{cfg.labels}: excluded {len(skipped)} row(s) without any known label"
            + (f" (first at line {skipped[0]})" if skipped else "")
            + (f" and {not_ok} ingest error row(s)" if not_ok else "")
        )
    keep = [k for k, (line, _) in enumerate(ok) if line not in set(skipped)]
    kept_rows = [ok[k][1] for k in keep]
    y = y[keep]
    positives = np.nansum(y, axis=0)
    negatives = np.sum(y == 0, axis=0)
    empty = [f for f, n, m in zip(findings, positives, negatives, strict=True) if n == 0 or m == 0]
    if empty:
        raise ConfigError(
            f"{cfg.labels}: finding(s) {empty} have no positive (or no negative) image; "
            "remove them from data.findings / data.label_columns or fix the labels"
        )
    groups = _patient_groups(cfg, kept_rows, [ok[k][0] for k in keep])
    table = Table(
        paths=[r["path"] for r in kept_rows],
        labels=y.astype(np.float32),
        groups=groups,
        classes=findings,
        cached=_usable_cache_entries(cfg.labels, kept_rows, prep),
    )
    if cfg.limit is not None and cfg.limit < len(table):
        table = table.subset(grouped_subset(table.labels, table.groups, n=cfg.limit, seed=seed))
    return table


def _uncertain_value(cfg: DataConfig) -> float:
    return {"mask": np.nan, "zero": 0.0, "one": 1.0}[cfg.uncertain]


def _from_columns(
    cfg: DataConfig, rows: list[tuple[int, dict[str, str]]]
) -> tuple[list[str], np.ndarray, list[int]]:
    """Findings from 0/1 columns; blank or -1 (CheXpert's uncertain) follow ``data.uncertain``."""
    assert cfg.label_columns is not None
    findings = list(cfg.findings or cfg.label_columns)
    header = list(rows[0][1]) if rows else []
    missing = [c for c in findings if c not in header]
    if missing:
        raise ConfigError(
            f"{cfg.labels}: no column(s) {missing} (data.label_columns); columns: {', '.join(header)}"
        )
    unknown = _uncertain_value(cfg)
    y = np.empty((len(rows), len(findings)), dtype=np.float64)
    for i, (line, r) in enumerate(rows):
        for j, f in enumerate(findings):
            v = (r[f] or "").strip().lower()
            if v in _POSITIVE:
                y[i, j] = 1.0
            elif v in _NEGATIVE:
                y[i, j] = 0.0
            elif v in _UNKNOWN:
                y[i, j] = unknown
            else:
                raise ConfigError(
                    f"{cfg.labels}, line {line}: column {f!r} holds {r[f]!r}; expected 1, 0, "
                    "-1 (uncertain) or blank (unknown)"
                )
    skipped = [line for (line, _), row in zip(rows, y, strict=True) if np.isnan(row).all()]
    return findings, y, skipped


def _from_separated(
    cfg: DataConfig, rows: list[tuple[int, dict[str, str]]], log: Callable[[str], None] | None
) -> tuple[list[str], np.ndarray, list[int]]:
    """Findings from one column of names joined by ``data.label_separator`` (NIH's
    ``Atelectasis|Effusion``; ``No Finding`` means none). A blank cell is an unlabelled row."""
    column, sep = cfg.label_column, cfg.label_separator
    assert sep is not None
    if rows and column not in rows[0][1]:
        raise ConfigError(
            f"{cfg.labels}: no column {column!r} (data.label_column); columns: "
            f"{', '.join(rows[0][1])}"
        )
    named = [{n.strip() for n in (r[column] or "").split(sep) if n.strip()} for _, r in rows]
    found = sorted(set().union(*named) - {n for n in set().union(*named) if _no_finding(n)})
    findings = list(cfg.findings or found)
    ignored = sorted(set(found) - set(findings))
    if ignored and log is not None:
        log(f"{cfg.labels}: findings {ignored} are not in data.findings; ignored")
    y = np.array(
        [[1.0 if f in names else 0.0 for f in findings] for names in named], dtype=np.float64
    ).reshape(len(rows), len(findings))
    skipped = [line for (line, _), names in zip(rows, named, strict=True) if not names]
    return findings, y, skipped


def _no_finding(name: str) -> bool:
    return name.strip().lower().replace(" ", "_") in {n.replace(" ", "_") for n in NO_FINDING}


def _classes(cfg: DataConfig, rows: list[dict[str, str]]) -> list[str]:
    found = {r[cfg.label_column] for r in rows}
    classes = cfg.classes or sorted(found)
    unknown = sorted(found - set(classes))
    if unknown:
        raise ConfigError(f"{cfg.labels}: labels {unknown} are not in data.classes {classes}")
    absent = [c for c in classes if c not in found]
    if absent:
        raise ConfigError(
            f"{cfg.labels}: data.classes {absent} have no image in column {cfg.label_column!r} "
            f"(found {sorted(found)}); fix data.classes or the labels"
        )
    if len(classes) < 2:
        raise ConfigError(f"{cfg.labels}: need at least two classes, found {classes}")
    return classes


def _patient_groups(cfg: DataConfig, rows: list[dict[str, str]], lines: list[int]) -> np.ndarray:
    """Patient ids per row. Some blank ids are an error (each would silently become a one-image
    patient whose other images could sit in another fold); a column with no id at all makes
    every image its own group, with a warning."""
    column = cfg.patient_column
    blank = [line for r, line in zip(rows, lines, strict=True) if not r.get(column)]
    if len(blank) == len(rows):  # no column, or an ingest manifest of files without patient ids
        warnings.warn(
            f"{cfg.labels}: no {column!r} values; each image is its own group, so one "
            "patient's images may land in different folds",
            stacklevel=3,
        )
        return np.array([r["path"] for r in rows])
    if blank:
        raise ConfigError(
            f"{cfg.labels}: {len(blank)} row(s) without a {column!r} (first at line {blank[0]}); "
            "every image needs its patient so that no patient spans two folds"
        )
    return np.array([r[column] for r in rows])


def _usable_cache_entries(
    labels_csv: Path, rows: list[dict[str, str]], prep: Preprocessing
) -> list[str | None]:
    """An ingest manifest's cache entries, when ingest used the same preprocessing."""
    if not rows or "cache_path" not in rows[0]:
        return []
    settings = Path(labels_csv).resolve().parent / "ingest.json"
    try:
        same = json.loads(settings.read_text())["preprocessing"] == prep.fingerprint()
    except (OSError, ValueError, KeyError):
        return []
    base = settings.parent
    return [str(base / r["cache_path"]) if same and r.get("cache_path") else None for r in rows]


def preflight(
    table: Table, prep: Preprocessing, cache: ImageCache | None, *, workers: int | None = None
) -> tuple[Table, list[dict[str, str]]]:
    """Decode every image once (filling the cache) in isolated decoder processes; drop the
    unreadable ones.

    A file that crashes or hangs its decoder is excluded like any unreadable file
    (``decoder_crashed`` / ``decoder_timeout``) instead of killing the run before its first epoch.

    Returns:
        The readable rows, and ``{path, error}`` for each dropped image (in table order), so that
        one bad file costs one image, not the run.
    """
    todo = [i for i in range(len(table)) if not (table.cached and table.cached[i])]
    failed: dict[int, str] = {}
    if todo:
        n = workers or min(os.cpu_count() or 1, 4)
        with DecoderPool(min(n, len(todo))) as pool:
            paths = [table.paths[i] for i in todo]
            for j, out in pool.imap_unordered(check_file, paths, prep, cache):
                if isinstance(out, ImageReadError):
                    failed[todo[j]] = out.short()
    keep = [i for i in range(len(table)) if i not in failed]
    excluded = [{"path": table.paths[i], "error": failed[i]} for i in sorted(failed)]
    return table.subset(np.array(keep, dtype=np.int64)), excluded


class XrayDataset(Dataset[dict[str, Any]]):
    """Images of a :class:`Table` as normalised 3xHxW tensors, optionally augmented."""

    def __init__(
        self,
        table: Table,
        prep: Preprocessing,
        *,
        cache: ImageCache | None = None,
        augment: AugmentConfig | None = None,
        normalization: Normalization,
        seed: int = 0,
    ) -> None:
        self.table = table
        self.prep = prep
        self.cache = cache
        self.augment = (
            _build_augment(augment, prep.image_size) if augment and augment.enabled else None
        )
        self.seed = seed
        self.normalization = normalization
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Re-seed augmentation so that epoch ``e`` is the same after a resume."""
        if self.augment is not None:
            self.augment.set_random_state(seed=(self.seed * 100_003 + epoch) % 2**31)

    def __len__(self) -> int:
        return len(self.table)

    def load_pixels(self, i: int) -> np.ndarray:
        """Float32 HxW in [0, 1] at the working size."""
        return load_pixels(self.table, i, self.prep, self.cache)

    def __getitem__(self, i: int) -> dict[str, Any]:
        x = torch.from_numpy(self.load_pixels(i))
        if self.augment is not None:
            out = self.augment(x.unsqueeze(0))
            x = (out.as_tensor() if hasattr(out, "as_tensor") else out).clamp_(0.0, 1.0)[0]
        image = to_model_input(x, self.normalization)
        y = self.table.labels[i]
        label = torch.from_numpy(np.asarray(y, np.float32)) if self.table.multilabel else int(y)
        sample = {"image": image, "label": label, "index": i}
        if self.table.teacher_logits is not None:
            sample["teacher"] = torch.from_numpy(self.table.teacher_logits[i])
        return sample


def load_pixels(table: Table, i: int, prep: Preprocessing, cache: ImageCache | None) -> np.ndarray:
    """Image ``i`` of ``table`` as the model's float32 input in [0, 1]: the ingest cache entry
    when the table has one, else the file preprocessed through ``cache``."""
    entry = table.cached[i] if table.cached else None
    if entry and (pixels := read_cached(entry)) is not None:
        return pixels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return preprocess_file(table.paths[i], prep, cache=cache).pixels


def worker_init(worker_id: int) -> None:
    """Give each DataLoader worker its own augmentation stream, derived from the loader's seed."""
    info = torch.utils.data.get_worker_info()
    if info is not None and getattr(info.dataset, "augment", None) is not None:
        info.dataset.augment.set_random_state(seed=info.seed % 2**31)


def _build_augment(cfg: AugmentConfig, size: int) -> Any:
    from monai.data import set_track_meta
    from monai.transforms import Compose, RandAdjustContrast, RandAffine, RandFlip

    set_track_meta(False)  # plain tensors: metadata tracking costs time and is not used here

    transforms: list[Any] = [
        RandAffine(
            prob=cfg.prob,
            rotate_range=(np.deg2rad(cfg.rotate_deg),),
            scale_range=(cfg.scale, cfg.scale),
            translate_range=(cfg.translate * size, cfg.translate * size),
            padding_mode="zeros",
            mode="bilinear",
        ),
        RandAdjustContrast(prob=cfg.prob, gamma=cfg.gamma),
    ]
    if cfg.hflip:
        transforms.append(RandFlip(prob=0.5, spatial_axis=1))
    return Compose(transforms)
