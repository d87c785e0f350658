"""From a labels CSV (or an ingest manifest) to model-ready tensors.

Samples are dicts with fixed keys (``image``, ``label``, ``index``); the image is 3xHxW float32,
the grey channel repeated three times and normalised with the statistics the backbone's
pretrained checkpoints were trained with (:func:`normalization_for`).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from xraycls.config import AugmentConfig, DataConfig
from xraycls.cv import grouped_subset
from xraycls.errors import ConfigError, ImageReadError
from xraycls.manifest import LabelsError, read_labels
from xraycls.preprocess import ImageCache, Preprocessing, preprocess_file

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
INCEPTION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
_FAMILY_NORMALIZATION = {
    "swin": IMAGENET,
    "resnet": IMAGENET,
    "maxvit": INCEPTION,
    "vit": INCEPTION,
}
"""Microsoft's Swin and timm's ResNet50 checkpoints use ImageNet statistics; timm's MaxViT-TF
and Google's ViT-in21k checkpoints use 0.5/0.5. Feeding the wrong ones shifts every input."""


def normalization_for(model_name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel for a backbone's pretrained checkpoints."""
    from xraycls.models import get_spec

    return _FAMILY_NORMALIZATION[get_spec(model_name).family]


@dataclass
class Table:
    """The images of an experiment: paths, integer labels, patient groups."""

    paths: list[str]
    labels: np.ndarray
    groups: np.ndarray
    classes: list[str]
    cached: list[str | None] = field(default_factory=list)
    """Per image, an ingest cache entry usable as is (same preprocessing), else None."""

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, idx: np.ndarray) -> Table:
        """The rows at ``idx``."""
        return Table(
            [self.paths[i] for i in idx],
            self.labels[idx],
            self.groups[idx],
            self.classes,
            [self.cached[i] for i in idx] if self.cached else [],
        )


def load_table(cfg: DataConfig, prep: Preprocessing, *, seed: int = 0) -> Table:
    """Read the labels CSV or manifest named by ``cfg.labels``.

    Manifest rows with ``status`` other than ``ok`` are skipped. Rows without a label are
    skipped. Without a patient column each image is its own group (with a warning: images of
    one patient may then fall in different folds).

    Raises:
        ConfigError: The file or the label column is missing, or fewer than two classes remain.
    """
    try:
        rows = read_labels(cfg.labels)
    except LabelsError as e:
        raise ConfigError(f"data.labels: {e}") from e
    if rows and cfg.label_column not in rows[0]:
        cols = ", ".join(rows[0])
        raise ConfigError(
            f"{cfg.labels}: no column {cfg.label_column!r} (data.label_column); columns: {cols}"
        )
    rows = [r for r in rows if r.get("status", "ok") == "ok" and r.get(cfg.label_column)]
    classes = cfg.classes or sorted({r[cfg.label_column] for r in rows})
    unknown = sorted({r[cfg.label_column] for r in rows} - set(classes))
    if unknown:
        raise ConfigError(f"{cfg.labels}: labels {unknown} are not in data.classes {classes}")
    if len(classes) < 2:
        raise ConfigError(f"{cfg.labels}: need at least two classes, found {classes}")
    has_groups = bool(rows) and bool(rows[0].get(cfg.patient_column))
    if not has_groups:
        warnings.warn(
            f"{cfg.labels}: no {cfg.patient_column!r} values; each image is its own group, so one "
            "patient's images may land in different folds",
            stacklevel=2,
        )
    index = {c: i for i, c in enumerate(classes)}
    table = Table(
        paths=[r["path"] for r in rows],
        labels=np.array([index[r[cfg.label_column]] for r in rows], dtype=np.int64),
        groups=np.array([r.get(cfg.patient_column) or r["path"] for r in rows]),
        classes=classes,
        cached=_usable_cache_entries(cfg.labels, rows, prep),
    )
    if cfg.limit is not None and cfg.limit < len(table):
        table = table.subset(grouped_subset(table.labels, table.groups, n=cfg.limit, seed=seed))
    return table


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
    table: Table, prep: Preprocessing, cache: ImageCache | None
) -> tuple[Table, list[dict[str, str]]]:
    """Decode every image once (filling the cache); drop the unreadable ones.

    Returns:
        The readable rows, and ``{path, error}`` for each dropped image, so that one bad file
        costs one image, not the run.
    """
    keep, excluded = [], []
    for i, path in enumerate(table.paths):
        if table.cached and table.cached[i]:
            keep.append(i)
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                preprocess_file(path, prep, cache=cache)
            keep.append(i)
        except ImageReadError as e:
            excluded.append({"path": path, "error": e.short()})
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
        normalization: tuple[tuple[float, ...], tuple[float, ...]] = IMAGENET,
        seed: int = 0,
    ) -> None:
        self.table = table
        self.prep = prep
        self.cache = cache
        self.augment = (
            _build_augment(augment, prep.image_size) if augment and augment.enabled else None
        )
        self.seed = seed
        self._mean = torch.tensor(normalization[0]).view(3, 1, 1)
        self._std = torch.tensor(normalization[1]).view(3, 1, 1)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Re-seed augmentation so that epoch ``e`` is the same after a resume."""
        if self.augment is not None:
            self.augment.set_random_state(seed=(self.seed * 100_003 + epoch) % 2**31)

    def __len__(self) -> int:
        return len(self.table)

    def load_pixels(self, i: int) -> np.ndarray:
        """Float32 HxW in [0, 1] at the working size."""
        cached = self.table.cached[i] if self.table.cached else None
        if cached:
            return np.load(cached, allow_pickle=False).astype(np.float32) / 65535.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return preprocess_file(self.table.paths[i], self.prep, cache=self.cache).pixels

    def __getitem__(self, i: int) -> dict[str, Any]:
        x = torch.from_numpy(self.load_pixels(i)).unsqueeze(0)
        if self.augment is not None:
            out = self.augment(x)
            x = (out.as_tensor() if hasattr(out, "as_tensor") else out).clamp_(0.0, 1.0)
        x = (x.expand(3, -1, -1) - self._mean) / self._std
        return {"image": x.contiguous(), "label": int(self.table.labels[i]), "index": i}


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
