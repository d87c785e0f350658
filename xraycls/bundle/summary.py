"""What a run bundle says about itself, for pickers and reports: identity, the cross-validation
AUROC with its interval, and what the served model does on data it never saw (calibration and
operating point, cross-fitted). Read from the bundle's structured files (``bundle.json``,
``metrics.json``, ``calibration.json``), never from its Markdown."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xraycls.bundle.format import (
    INTENSITY_FILE,
    OOF_FILE,
    Bundle,
    BundleError,
    Members,
    read_oof,
)
from xraycls.evaluation.metrics import (
    auroc,
    bootstrap_ci,
    macro_auroc,
    multilabel_bootstrap_ci,
    sigmoid,
    softmax,
)
from xraycls.io.ood import IntensityReference, reference_from_files
from xraycls.io.preprocess import Preprocessing

CONFIGURATION_NAMES = {"folds": "fold ensemble", "refit": "refit model"}


@dataclass(frozen=True)
class ThresholdInfo:
    """A served configuration's binary operating point and what it does on unseen patients."""

    positive: str
    target: str
    """``sensitivity``, ``specificity`` or ``youden``."""
    value: float | None
    threshold: float
    sensitivity: dict[str, float] | None = None
    """Cross-fitted on the calibration data: ``{value, low, high}``."""
    specificity: dict[str, float] | None = None

    def describe(self) -> str:
        """E.g. ``95%-sensitivity threshold``."""
        if self.target == "youden" or self.value is None:
            return "Youden threshold"
        return f"{self.value:.0%}-{self.target} threshold"


def threshold_info(entry: dict[str, Any] | None) -> ThresholdInfo | None:
    """The operating point of a stored calibration entry (None without one)."""
    t = (entry or {}).get("threshold")
    if not t:
        return None
    at = (entry or {}).get("validation", {}).get("at_threshold") or {}
    return ThresholdInfo(
        positive=str(t["positive"]),
        target=str(t["target"]),
        value=_finite(t.get("value")),
        threshold=float(t["threshold"]),
        sensitivity=at.get("sensitivity"),
        specificity=at.get("specificity"),
    )


@dataclass(frozen=True)
class FindingSummary:
    """One finding of a multi-label served configuration: its calibrator, operating threshold
    and their cross-fitted validation on data no model of the bundle saw."""

    name: str
    method: str
    positives: int
    auroc: dict[str, float]
    ece: dict[str, float]
    threshold: float | None
    sensitivity: dict[str, float] | None
    specificity: dict[str, float] | None

    @classmethod
    def from_entry(cls, name: str, entry: dict[str, Any]) -> FindingSummary:
        """From a finding's entry in a multi-label calibration (``findings.<name>``)."""
        v = entry["validation"]
        at = v.get("at_threshold") or {}
        t = entry.get("threshold") or {}
        return cls(
            name=name,
            method=entry["method"],
            positives=int(entry["data"]["class_counts"].get(name, 0)),
            auroc=v["auroc"],
            ece=v["per_class"][name]["ece"],
            threshold=_finite(t.get("threshold")),
            sensitivity=at.get("sensitivity"),
            specificity=at.get("specificity"),
        )


@dataclass(frozen=True)
class ServedSummary:
    """One served configuration under one calibration, as validated."""

    configuration: str
    calibration_name: str
    method: str
    source: str
    n_images: int
    auroc: dict[str, float]
    ece: dict[str, float]
    ece_uncalibrated: dict[str, float]
    threshold: ThresholdInfo | None
    findings: dict[str, FindingSummary] = field(default_factory=dict)
    """Multi-label: each finding's calibration and operating point (empty for one label)."""

    @classmethod
    def from_entry(cls, entry: dict[str, Any], calibration_name: str) -> ServedSummary:
        """From a configuration's entry in a calibration file."""
        v = entry["validation"]
        if entry.get("task") == "multilabel":
            macro = v["macro"]
            nan = float("nan")
            return cls(
                configuration=entry["configuration"],
                calibration_name=calibration_name,
                method=entry["method"],
                source=entry["data"]["source"],
                n_images=int(entry["data"]["n_images"]),
                auroc={"value": macro["auroc"], "low": nan, "high": nan},
                ece={"value": macro["ece"], "low": nan, "high": nan},
                ece_uncalibrated={"value": macro["ece_uncalibrated"], "low": nan, "high": nan},
                threshold=None,
                findings={f: FindingSummary.from_entry(f, e) for f, e in entry["findings"].items()},
            )
        return cls(
            configuration=entry["configuration"],
            calibration_name=calibration_name,
            method=entry["method"],
            source=entry["data"]["source"],
            n_images=int(entry["data"]["n_images"]),
            auroc=v["auroc"],
            ece=v["ece"],
            ece_uncalibrated=v["ece_uncalibrated"],
            threshold=threshold_info(entry),
        )

    def text(self) -> str:
        """One paragraph: discrimination, calibration and operating point, with intervals."""
        name = CONFIGURATION_NAMES.get(self.configuration, self.configuration)
        if self.findings:
            return (
                f"{name} on {self.n_images} {self.source} images no model of it saw: macro AUROC "
                f"{ci_text(self.auroc)} over {len(self.findings)} findings; calibration "
                f"{self.method}, macro ECE {self.ece_uncalibrated['value']:.3f} -> "
                f"{ci_text(self.ece)} (cross-fitted); one operating threshold per finding"
            )
        out = (
            f"{name} on {self.n_images} {self.source} images no model of it saw: AUROC "
            f"{ci_text(self.auroc)}; {self.method} calibration, ECE "
            f"{self.ece_uncalibrated['value']:.3f} -> {ci_text(self.ece)} (cross-fitted)"
        )
        t = self.threshold
        if t is not None:
            out += (
                f"; {t.describe()} {t.threshold:.3f} on P({t.positive}): sensitivity "
                f"{ci_text(t.sensitivity)}, specificity {ci_text(t.specificity)} (cross-fitted)"
            )
        return out


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
    cv_auroc: float | None
    """Pooled out-of-fold AUROC of the fold models (the recipe), not of the served model."""
    cv_auroc_ci: tuple[float, float] | None
    default: str
    """The configuration served by default (``folds`` or ``refit``)."""
    served: dict[str, ServedSummary] = field(default_factory=dict)
    """Per calibrated configuration (the bundle's own calibration)."""
    site_calibrations: tuple[str, ...] = ()
    fold_members: int = 0
    has_refit: bool = False
    multilabel: bool = False
    """The classes are findings (one sigmoid each, any number present)."""

    def label(self) -> str:
        """One line for a model picker: ``name (backbone, 224 px, AUROC 0.95)``."""
        s = self.served.get(self.default)
        auc = s.auroc["value"] if s else self.cv_auroc
        return f"{self.name} ({self.backbone}, {self.image_size} px" + (
            f", AUROC {auc:.3f})" if auc is not None else ")"
        )

    def cv_auroc_text(self) -> str:
        """``0.951 [0.930, 0.968]`` (pooled out-of-fold, 95% patient-level bootstrap)."""
        if self.cv_auroc is None:
            return "n/a"
        if self.cv_auroc_ci is None:
            return f"{self.cv_auroc:.3f} (no interval)"
        return f"{self.cv_auroc:.3f} [{self.cv_auroc_ci[0]:.3f}, {self.cv_auroc_ci[1]:.3f}]"

    def served_text(self, configuration: str) -> str:
        """What the given configuration does on unseen patients, or why nothing can be said."""
        s = self.served.get(configuration)
        if s is None:
            return (
                f"{CONFIGURATION_NAMES.get(configuration, configuration)}: uncalibrated (raw "
                "softmax probabilities); not validated on data its models never saw"
            )
        return s.text()


def ci_text(d: dict[str, float] | None) -> str:
    """``0.950 [0.910, 0.980]`` from ``{value, low, high}`` (n/a when missing)."""
    if not d or _finite(d.get("value")) is None:
        return "n/a"
    lo, hi = _finite(d.get("low")), _finite(d.get("high"))
    if lo is None or hi is None:
        return f"{d['value']:.3f}"
    return f"{d['value']:.3f} [{lo:.3f}, {hi:.3f}]"


def summarize_run(run_dir: str | Path) -> RunSummary:
    """Read a bundle's identity, cross-validation AUROC (with interval) and served calibration.

    The AUROC interval is the patient-level bootstrap interval stored in ``metrics.json`` when
    the model card was written; a bundle without one gets it computed from the out-of-fold
    predictions.

    Raises:
        BundleError: ``bundle.json`` or ``labels.json`` is missing or unreadable, or the
            calibration is of an older format.
    """
    bundle = Bundle.read(run_dir)
    metrics = bundle.metrics()
    value = _finite((metrics.get("pooled_oof") or {}).get("auroc"))
    stored = (metrics.get("pooled_oof_ci") or {}).get("auroc") or {}
    ci = None
    if _finite(stored.get("low")) is not None and _finite(stored.get("high")) is not None:
        ci = (float(stored["low"]), float(stored["high"]))
    elif value is not None:
        ci = _bootstrap_auroc_ci(bundle)
    cal = bundle.calibration()
    served = {
        k: ServedSummary.from_entry(e, "default")
        for k, e in ((cal or {}).get("configurations") or {}).items()
    }
    return RunSummary(
        path=bundle.path,
        name=bundle.path.name,
        backbone=bundle.model,
        image_size=bundle.image_size,
        data=bundle.training_data(),
        n_images=metrics.get("n_images"),
        n_patients=metrics.get("n_patients"),
        classes=bundle.classes,
        cv_auroc=value,
        cv_auroc_ci=ci,
        default=bundle.default_members(),
        served=served,
        site_calibrations=tuple(bundle.site_calibrations()),
        fold_members=sum(1 for f in bundle.fold_weights if f.is_file()),
        has_refit=bool(bundle.refit_weights and bundle.refit_weights.is_file()),
        multilabel=bundle.multilabel,
    )


def default_members(summary: RunSummary) -> Members:
    """The configuration the bundle serves by default."""
    return summary.default  # type: ignore[return-value]


def _bootstrap_auroc_ci(bundle: Bundle) -> tuple[float, float] | None:
    try:
        oof = bundle.oof()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if bundle.multilabel:
                _, lo, hi = multilabel_bootstrap_ci(
                    macro_auroc, sigmoid(oof.logits), oof.labels, groups=oof.groups
                )
                return lo, hi
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
