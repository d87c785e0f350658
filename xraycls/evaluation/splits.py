"""Patient-grouped splits: no patient ever appears on both sides of a split.

Every function takes N integer labels (multi-class: stratified by label with scikit-learn's
``StratifiedGroupKFold``) or an N x K matrix of 0/1 finding labels with NaN for unknown
(multi-label: iterative stratification over patients, :func:`multilabel_parts`).
"""

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
    if labels.ndim == 2:
        return multilabel_parts(labels, groups, n_parts=folds, seed=seed)
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
    if np.asarray(labels).ndim == 2:
        part = multilabel_parts(labels, groups, n_parts=n_splits, seed=seed)
        return np.flatnonzero(part != 0), np.flatnonzero(part == 0)
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    train, val = next(splitter.split(np.zeros(len(labels)), labels, groups))
    return train, val


def grouped_subset(labels: np.ndarray, groups: np.ndarray, *, n: int, seed: int) -> np.ndarray:
    """About ``n`` indices, whole patients only, keeping the label balance (sorted)."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    if n >= len(labels):
        return np.arange(len(labels))
    n_splits = max(2, round(len(labels) / n))
    if labels.ndim == 2:
        return np.flatnonzero(multilabel_parts(labels, groups, n_parts=n_splits, seed=seed) == 0)
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
    if labels.ndim == 2:
        return _multilabel_holdout(labels, groups, n_splits=n_splits, seed=seed + 7919)
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


# --------------------------------------------------------------------------- multi-label


def multilabel_parts(
    labels: np.ndarray, groups: np.ndarray, *, n_parts: int, seed: int
) -> np.ndarray:
    """Assign each image a part in ``range(n_parts)``, whole patients only, so that every
    finding's positive patients spread as evenly as they can over the parts.

    Iterative stratification (Sechidis, Tsoumakas & Vlahavas 2011) over patients: a patient's
    label vector is the number of its images positive for each finding. Findings are served
    rarest first; each patient carrying the current finding goes to the part that still
    wants most of that finding (ties: the part that wants most images, then at random).
    Patients without any positive then fill the parts that want most images.

    Args:
        labels: N x K 0/1 labels, NaN where unknown (an unknown label is not a positive).
        groups: N patient ids.
        n_parts: Number of parts.
        seed: Tie-breaking seed.

    Raises:
        ValueError: Fewer patients than parts.
    """
    y = np.nan_to_num(np.asarray(labels, dtype=np.float64), nan=0.0)
    groups = np.asarray(groups)
    patients, inverse = np.unique(groups, return_inverse=True)
    if len(patients) < n_parts:
        raise ValueError(f"{len(patients)} patients cannot fill {n_parts} parts")
    rng = np.random.default_rng(seed)
    n_pat, k = len(patients), y.shape[1]
    pos = np.zeros((n_pat, k))
    np.add.at(pos, inverse, y)
    size = np.bincount(inverse, minlength=n_pat).astype(np.float64)
    want = np.tile(pos.sum(0) / n_parts, (n_parts, 1))  # parts x findings
    want_size = np.full(n_parts, size.sum() / n_parts)
    part_of = np.full(n_pat, -1, dtype=np.int64)
    left = pos > 0
    order = rng.permutation(n_pat)  # visiting order of patients; random ties
    while left.any():
        remaining = left.sum(0)
        f = int(np.argmin(np.where(remaining > 0, remaining, np.inf)))
        for p in order[left[order, f]]:
            best = np.flatnonzero(want[:, f] == want[:, f].max())
            if len(best) > 1:
                best = best[want_size[best] == want_size[best].max()]
            q = int(rng.choice(best))
            part_of[p] = q
            want[q] -= pos[p]
            want_size[q] -= size[p]
            left[p] = False
    for p in order[part_of[order] < 0]:
        best = np.flatnonzero(want_size == want_size.max())
        q = int(rng.choice(best))
        part_of[p] = q
        want_size[q] -= size[p]
    return part_of[inverse]


def positives_per_part(labels: np.ndarray, part: np.ndarray, n_parts: int) -> np.ndarray:
    """Positive images of each finding in each part (parts x findings); NaN is not positive."""
    y = np.nan_to_num(np.asarray(labels, dtype=np.float64), nan=0.0)
    return np.array([y[part == q].sum(0) for q in range(n_parts)])


def _multilabel_holdout(
    labels: np.ndarray, groups: np.ndarray, *, n_splits: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    part = multilabel_parts(labels, groups, n_parts=n_splits, seed=seed)
    counts = positives_per_part(labels, part, n_splits)
    known = ~np.isnan(np.asarray(labels, dtype=np.float64))
    negatives = np.array(
        [((np.nan_to_num(labels) == 0) & known)[part == q].sum(0) for q in range(n_splits)]
    )
    ok = [q for q in range(n_splits) if counts[q].min() >= 2 and negatives[q].min() >= 2]
    if ok:
        return np.flatnonzero(part != ok[0]), np.flatnonzero(part == ok[0])
    best = int(np.argmax(counts.min(1)))
    f = int(np.argmin(counts[best]))
    raise ValueError(
        f"a calibration holdout of 1/{n_splits} of the patients holds at most "
        f"{int(counts[best, f])} positive image(s) of finding #{f}; use more data or a larger "
        "cv.calibration_holdout"
    )
