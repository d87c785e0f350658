"""Classification metrics on predicted probabilities (scikit-learn underneath).

Binary problems report the last class as "positive" (e.g. PNEUMONIA after NORMAL); multi-class
problems report one-vs-rest AUROC per class and macro averages.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    roc_auc_score,
)


def classification_metrics(
    probs: np.ndarray, labels: np.ndarray, classes: list[str]
) -> dict[str, float | dict[str, float]]:
    """AUROC, accuracy, sensitivity, specificity, F1 and balanced accuracy.

    Args:
        probs: N x C class probabilities.
        labels: N integer labels in ``range(C)``.
        classes: Class names, in column order.

    Returns:
        A flat dict for binary problems (sensitivity/specificity of the positive class at the
        argmax decision); for multi-class, macro averages plus ``per_class`` entries.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    n_classes = len(classes)
    pred = probs.argmax(1)
    out: dict[str, float | dict[str, float]] = {
        "n": float(len(labels)),
        "accuracy": float(accuracy_score(labels, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, pred)),
    }
    present = np.unique(labels)
    if n_classes == 2:
        out["auroc"] = _safe_auc(labels, probs[:, 1])
        tn, fp, fn, tp = confusion_matrix(labels, pred, labels=[0, 1]).ravel()
        out["sensitivity"] = _ratio(tp, tp + fn)
        out["specificity"] = _ratio(tn, tn + fp)
        out["f1"] = float(f1_score(labels, pred, pos_label=1, zero_division=0))
        return out
    per_class: dict[str, float] = {}
    for c, name in enumerate(classes):
        per_class[f"auroc_{name}"] = _safe_auc(labels == c, probs[:, c])
        tp = int(np.sum((pred == c) & (labels == c)))
        per_class[f"sensitivity_{name}"] = _ratio(tp, int(np.sum(labels == c)))
        tn = int(np.sum((pred != c) & (labels != c)))
        per_class[f"specificity_{name}"] = _ratio(tn, int(np.sum(labels != c)))
    aucs = [per_class[f"auroc_{n}"] for n in classes]
    out["auroc"] = float(np.nanmean(aucs)) if len(present) > 1 else float("nan")
    out["sensitivity"] = float(np.nanmean([per_class[f"sensitivity_{n}"] for n in classes]))
    out["specificity"] = float(np.nanmean([per_class[f"specificity_{n}"] for n in classes]))
    out["f1"] = float(
        f1_score(labels, pred, average="macro", labels=list(range(n_classes)), zero_division=0)
    )
    out["per_class"] = per_class
    return out


def _safe_auc(y: np.ndarray, score: np.ndarray) -> float:
    y = np.asarray(y).astype(int)
    if y.min() == y.max():
        return float("nan")  # undefined with one class present
    return float(roc_auc_score(y, score))


def _ratio(a: float, b: float) -> float:
    return float(a) / float(b) if b else float("nan")
