"""Patient-grouped splits: no patient ever appears on both sides of a split."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold


def patient_folds(labels: np.ndarray, groups: np.ndarray, *, folds: int, seed: int) -> np.ndarray:
    """Assign each image a fold in ``range(folds)``, stratified by label, grouped by patient.

    Raises:
        ValueError: Fewer patients than folds.
    """
    labels, groups = np.asarray(labels), np.asarray(groups)
    n_groups = len(np.unique(groups))
    if n_groups < folds:
        raise ValueError(f"{n_groups} patients cannot fill {folds} folds")
    fold = np.full(len(labels), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, test) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
        fold[test] = k
    return fold


def inner_split(
    labels: np.ndarray, groups: np.ndarray, *, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (train, validation) with about ``fraction`` of patients in validation."""
    n_splits = max(2, round(1.0 / fraction))
    n_groups = len(np.unique(groups))
    if n_groups < n_splits:
        n_splits = max(2, n_groups)
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    train, val = next(splitter.split(np.zeros(len(labels)), labels, groups))
    return train, val


def grouped_subset(labels: np.ndarray, groups: np.ndarray, *, n: int, seed: int) -> np.ndarray:
    """About ``n`` indices, whole patients only, keeping the label balance (sorted)."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    if n >= len(labels):
        return np.arange(len(labels))
    n_splits = max(2, round(len(labels) / n))
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    _, chosen = next(splitter.split(np.zeros(len(labels)), labels, groups))
    return np.sort(chosen)


def holdout_split(
    labels: np.ndarray, groups: np.ndarray, *, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (development, holdout): about ``fraction`` of the patients, stratified by label,
    set aside whole (sorted). ``fraction`` 0 holds out nothing.

    Raises:
        ValueError: The holdout would miss a class or hold fewer than 2 patients of one.
    """
    labels, groups = np.asarray(labels), np.asarray(groups)
    if fraction <= 0:
        return np.arange(len(labels)), np.zeros(0, dtype=np.int64)
    n_splits = max(2, round(1.0 / fraction))
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed + 7919)
    fewest = 0
    # The first of the splitter's parts that holds at least two patients of every class (on
    # small sets with multi-image patients, one part may not).
    for dev, hold in splitter.split(np.zeros(len(labels)), labels, groups):
        per_class = [len(np.unique(groups[hold][labels[hold] == c])) for c in np.unique(labels)]
        if min(per_class) >= 2:
            return np.sort(dev), np.sort(hold)
        fewest = max(fewest, min(per_class))
    raise ValueError(
        f"a calibration holdout of {fraction:.0%} of the patients holds at most {fewest} "
        "patient(s) of some class; use more data or a larger cv.calibration_holdout"
    )
