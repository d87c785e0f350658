"""What a run bundle says about itself, for pickers and reports: identity, headline AUROC
with its interval, calibration and operating point. Read from the bundle's structured files
(``bundle.json``, ``metrics.json``, ``calibration.json``), never from its Markdown."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xraycls.bundle.format import INTENSITY_FILE, OOF_FILE, Bundle, BundleError, Members, read_oof
from xraycls.evaluation.metrics import auroc, bootstrap_ci, softmax
from xraycls.io.ood import IntensityReference, reference_from_files
from xraycls.io.preprocess import Preprocessing


@dataclass(frozen=True)
class ThresholdInfo:
    """The binary operating point stored in ``calibration.json``."""

    positive: str
    target: str
    """``sensitivity``, ``specificity`` or ``youden``."""
    value: float | None
    threshold: float
    oof_sensitivity: float | None = None
    oof_specificity: float | None = None

    def describe(self) -> str:
        """E.g. ``95%-sensitivity threshold``."""
        if self.target == "youden" or self.value is None:
            return "Youden threshold"
        return f"{self.value:.0%}-{self.target} threshold"


@dataclass(frozen=True)
class RunSummary:
    """What the viewer shows about a run bundle, read from the bundle's files."""

    path: Path
    name: str
    backbone: str
    image_size: int
    data: str
    n_images: int | None
    n_patients: int | None
    classes: tuple[str, ...]
    auroc: float | None
    auroc_ci: tuple[float, float] | None
    calibration: str | None
    ece_before: float | None
    ece_after: float | None
    threshold: ThresholdInfo | None
    fold_members: int
    has_refit: bool

    def label(self) -> str:
        """One line for a model picker: ``name (backbone, 224 px, AUROC 0.95)``."""
        auc = f", AUROC {self.auroc:.3f}" if self.auroc is not None else ""
        return f"{self.name} ({self.backbone}, {self.image_size} px{auc})"

    def auroc_text(self) -> str:
        """``0.951 [0.930, 0.968]`` (pooled out-of-fold, 95% patient-level bootstrap)."""
        if self.auroc is None:
            return "n/a"
        if self.auroc_ci is None:
            return f"{self.auroc:.3f} (no interval)"
        return f"{self.auroc:.3f} [{self.auroc_ci[0]:.3f}, {self.auroc_ci[1]:.3f}]"

    def calibration_text(self) -> str:
        """Method, ECE before -> after and the operating threshold, in one line."""
        if self.calibration is None:
            return "none (raw softmax probabilities)"
        text = self.calibration
        if self.ece_before is not None and self.ece_after is not None:
            text += f", ECE {self.ece_before:.3f} -> {self.ece_after:.3f} (cross-fitted)"
        if self.threshold is not None:
            t = self.threshold
            text += f"; {t.describe()} {t.threshold:.3f} on P({t.positive})"
        return text


def summarize_run(run_dir: str | Path) -> RunSummary:
    """Read a bundle's identity, headline AUROC (with interval) and calibration.

    The AUROC interval is the patient-level bootstrap interval stored in ``metrics.json`` when
    the model card was written; a bundle without one gets it computed from the out-of-fold
    predictions.

    Raises:
        BundleError: ``bundle.json`` or ``labels.json`` is missing or unreadable.
    """
    bundle = Bundle.read(run_dir)
    metrics = bundle.metrics()
    pooled = metrics.get("pooled_oof") or {}
    value = _finite(pooled.get("auroc"))
    stored = (metrics.get("pooled_oof_ci") or {}).get("auroc") or {}
    ci = None
    if _finite(stored.get("low")) is not None and _finite(stored.get("high")) is not None:
        ci = (float(stored["low"]), float(stored["high"]))
    elif value is not None:
        ci = _bootstrap_auroc_ci(bundle)
    cal_file = bundle.calibration()
    cal_summary = (cal_file or {}).get("summary") or metrics.get("calibration") or {}
    threshold = None
    t = (cal_file or {}).get("threshold")
    if t:
        at = t.get("oof_at_threshold") or {}
        threshold = ThresholdInfo(
            positive=str(t["positive"]),
            target=str(t["target"]),
            value=_finite(t.get("value")),
            threshold=float(t["threshold"]),
            oof_sensitivity=_finite(at.get("sensitivity")),
            oof_specificity=_finite(at.get("specificity")),
        )
    return RunSummary(
        path=bundle.path,
        name=bundle.path.name,
        backbone=bundle.model,
        image_size=bundle.image_size,
        data=bundle.training_data(),
        n_images=metrics.get("n_images"),
        n_patients=metrics.get("n_patients"),
        classes=bundle.classes,
        auroc=value,
        auroc_ci=ci,
        calibration=cal_summary.get("method") if cal_file else None,
        ece_before=_finite((cal_summary.get("before") or {}).get("ece")) if cal_file else None,
        ece_after=(
            _finite((cal_summary.get("after_crossfit") or {}).get("ece")) if cal_file else None
        ),
        threshold=threshold,
        fold_members=sum(1 for f in bundle.fold_weights if f.is_file()),
        has_refit=bool(bundle.refit_weights and bundle.refit_weights.is_file()),
    )


def default_members(summary: RunSummary) -> Members:
    """``folds`` when the bundle has two or more fold models (their spread is the uncertainty
    to show; calibration and threshold were fitted on their out-of-fold logits), else ``refit``."""
    return "folds" if summary.fold_members >= 2 or not summary.has_refit else "refit"


def _bootstrap_auroc_ci(bundle: Bundle) -> tuple[float, float] | None:
    try:
        oof = bundle.oof()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, lo, hi = bootstrap_ci(
                auroc, softmax(oof.logits), oof.labels, groups=oof.groups, n_boot=1000
            )
    except (BundleError, ValueError):
        return None
    return lo, hi


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def intensity_reference_for_run(
    run_dir: str | Path, prep: Preprocessing, *, max_images: int = 200, seed: int = 0
) -> tuple[IntensityReference | None, str]:
    """The bundle's stored intensity reference, else one computed from its training images.

    A bundle written by ``xraycls train`` stores ``intensity_reference.json``. For an older one,
    up to ``max_images`` images listed in ``oof_predictions.csv`` (every image of the
    cross-validation) are sampled and preprocessed with ``prep``; nothing is written.

    Returns:
        The reference (None when neither is available) and a sentence saying where it came from.
    """
    run = Path(run_dir)
    path = run / INTENSITY_FILE
    if path.exists():
        try:
            ref = IntensityReference.from_dict(json.loads(path.read_text()))
            return ref, f"stored in the bundle ({INTENSITY_FILE}, {ref.n} images)"
        except (OSError, KeyError, TypeError, ValueError):
            pass  # unreadable: compute one instead
    try:
        paths = read_oof(run).paths
    except BundleError:
        return None, "the bundle stores no intensity reference and lists no training images"
    ref = reference_from_files(paths, prep, max_images=max_images, seed=seed)
    if ref is None:
        return None, (
            f"the bundle stores no intensity reference and its training images "
            f"({len(paths)} listed in {OOF_FILE}) are not readable from here"
        )
    return ref, f"{ref.source} listed in {OOF_FILE} (not stored in the bundle)"
