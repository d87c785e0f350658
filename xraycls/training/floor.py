"""The floor every model is measured against: logistic regression on 32x32 pixels.

On the pediatric pneumonia data this floor already reaches an AUROC in the high 0.9s (the set
has acquisition shortcuts), so a backbone's number means little until it is shown next to the
floor on the *same* folds.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from xraycls.io.preprocess import ImageCache, Preprocessing
from xraycls.training.data import Table, load_pixels

FLOOR_SIZE = 32


def floor_features(
    table: Table, prep: Preprocessing, *, cache: ImageCache | None = None
) -> np.ndarray:
    """N x 1024 features: each preprocessed image area-averaged to 32x32."""
    import cv2

    feats = np.empty((len(table), FLOOR_SIZE * FLOOR_SIZE), np.float32)
    for i in range(len(table)):
        pixels = load_pixels(table, i, prep, cache)
        feats[i] = cv2.resize(
            pixels, (FLOOR_SIZE, FLOOR_SIZE), interpolation=cv2.INTER_AREA
        ).ravel()
    return feats


def floor_oof_probs(
    features: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    folds: np.ndarray,
    *,
    n_classes: int,
    seed: int = 0,
) -> np.ndarray:
    """Out-of-fold class probabilities of a standardised logistic regression, on given folds.

    The regularisation strength is chosen inside each training fold by patient-grouped
    3-fold CV, never on the fold being predicted.
    """
    probs = np.zeros((len(labels), n_classes), np.float64)
    for k in np.unique(folds):
        tr, te = folds != k, folds == k
        inner = list(GroupKFold(n_splits=3).split(features[tr], labels[tr], groups[tr]))
        model = _fit_floor(features[tr], labels[tr], inner, seed)
        p = model.predict_proba(features[te])
        cols = model[-1].classes_
        probs[np.ix_(te, cols)] = p
    return probs


def floor_oof_multilabel(
    features: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    folds: np.ndarray,
    *,
    seed: int = 0,
) -> np.ndarray:
    """The floor for findings: one logistic regression per finding (one-vs-rest), on the same
    folds, each fitted on the training folds' known labels of its finding (NaN = unknown is
    left out). Returns N x K out-of-fold probabilities.

    The regularisation strength is chosen inside each training fold by patient-grouped 3-fold
    CV stratified on the finding, never on the fold being predicted.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    y = np.asarray(labels, np.float64)
    probs = np.zeros(y.shape, np.float64)
    for j in range(y.shape[1]):
        for k in np.unique(folds):
            tr = (folds != k) & ~np.isnan(y[:, j])
            te = folds == k
            yj = y[tr, j].astype(np.int64)
            splitter = StratifiedGroupKFold(n_splits=3, shuffle=True, random_state=seed)
            inner = list(splitter.split(features[tr], yj, groups[tr]))
            model = _fit_floor(features[tr], yj, inner, seed)
            probs[te, j] = model.predict_proba(features[te])[:, 1]
    return probs


def _fit_floor(
    x: np.ndarray, y: np.ndarray, inner: list[tuple[np.ndarray, np.ndarray]], seed: int
) -> Pipeline:
    """The floor's model on one training fold: standardised pixels, logistic regression with
    its strength chosen by log loss over the given (patient-grouped) inner splits."""
    model = make_pipeline(
        StandardScaler(),
        LogisticRegressionCV(
            Cs=np.logspace(-4, 1, 6),
            cv=inner,
            max_iter=3000,
            scoring="neg_log_loss",
            random_state=seed,
        ),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter on tiny folds
        model.fit(x, y)
    return model
