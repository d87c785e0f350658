"""A loaded run bundle that turns images into calibrated predictions.

The same :class:`Predictor` serves ``xraycls evaluate``, batch scoring and the viewer. Everything
that decides a prediction comes from the bundle, never from code defaults: backbone and input
size, preprocessing and normalisation (``bundle.json``), classes (``labels.json``), weights
(safetensors), calibration and operating threshold (``calibration.json``), all read through
:class:`xraycls.bundle.Bundle`.

Two backends compute the logits: ``torch`` (the safetensors weights) and ``onnx`` (the bundle's
ONNX export, run by onnxruntime on the CPU; :mod:`xraycls.inference.export`). Averaging,
calibration and the decision are the same code for both. Grad-CAM needs gradients, so it always
uses the PyTorch weights; with the onnx backend they are loaded only when a CAM asks for them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from xraycls.bundle.calibration import FindingCalibration, load_configuration
from xraycls.bundle.format import Bundle, BundleError, Members
from xraycls.errors import ImageReadError
from xraycls.evaluation.calibration import Calibrator
from xraycls.evaluation.metrics import sigmoid, softmax
from xraycls.io.ood import OODCriteria
from xraycls.io.preprocess import ImageCache, Preprocessing, preprocess_file
from xraycls.models.runtime import resolve_device
from xraycls.models.weights import Normalization, load_weights, to_model_input

if TYPE_CHECKING:
    from xraycls.inference.onnx_backend import OnnxRunner

Backend = Literal["torch", "onnx"]
BACKENDS: tuple[str, ...] = ("torch", "onnx")

NO_FINDING = "No Finding"
"""A multi-label decision when no finding reaches its threshold."""


@dataclass
class Prediction:
    """One image's result."""

    probs: np.ndarray
    """The served model's calibrated class probabilities (its raw softmax when the bundle has
    no calibration for it: see :attr:`Predictor.calibrated`). Multi-label: one independent
    calibrated probability per finding (raw sigmoid when uncalibrated)."""
    raw_probs: np.ndarray
    """Uncalibrated softmax (multi-label: sigmoid) of the served logits (the fold ensemble's
    mean logits)."""
    member_probs: np.ndarray
    """Each ensemble member's logits through the served calibrator (members x classes). The
    calibrator is fitted on the ensemble, not on each member: the spread shows how much the
    members disagree, not calibrated member probabilities."""
    predicted: str
    """The decision: the positive class at or above the stored threshold (binary), else argmax.
    Multi-label: the findings at or above their own thresholds joined by ``|``, or
    :data:`NO_FINDING`."""
    threshold: float | None
    calibrated: bool = True
    """False when the served configuration has no calibration: ``probs`` are raw softmax."""
    thresholds: np.ndarray | None = None
    """Multi-label: each finding's operating threshold (None when uncalibrated: 0.5 each)."""
    decisions: np.ndarray | None = None
    """Multi-label: each finding called present (``probs >= thresholds``)."""

    def ranked(self, classes: list[str]) -> list[tuple[str, float, bool | None]]:
        """``(class or finding, probability, decision)`` from the most probable down; the
        decision is None for a multi-class task."""
        order = np.argsort(-np.asarray(self.probs), kind="stable")
        dec = self.decisions
        return [
            (classes[i], float(self.probs[i]), None if dec is None else bool(dec[i])) for i in order
        ]


class Predictor:
    """Weights, preprocessing, labels, calibration and threshold of one run bundle."""

    def __init__(
        self,
        models: list[torch.nn.Module],
        *,
        classes: list[str],
        prep: Preprocessing,
        normalization: Normalization,
        calibrator: Calibrator | FindingCalibration | None,
        threshold: float | None,
        device: torch.device,
        run_dir: Path | None = None,
        configuration: str = "folds",
        calibration_name: str = "default",
        calibration_entry: dict[str, Any] | None = None,
        ood: OODCriteria | None = None,
        runner: OnnxRunner | None = None,
        load_models: Callable[[], list[torch.nn.Module]] | None = None,
        multilabel: bool = False,
    ) -> None:
        self._models: list[torch.nn.Module] | None = models if runner is None else None
        self._load_models = load_models
        self.runner = runner
        """The onnxruntime session when the backend is ``onnx``, else None."""
        self.n_members = len(models) if runner is None else int(runner.metadata["xraycls_members"])
        self.multilabel = multilabel
        """Findings (one sigmoid each, a decision per finding) rather than one class."""
        self.classes = classes
        self.prep = prep
        self.calibrator = calibrator
        self.threshold = threshold
        self.device = device
        self.run_dir = run_dir
        self.normalization = normalization
        self.configuration = configuration
        """``folds`` (the fold ensemble) or ``refit``: which of the bundle's models is served."""
        self.calibration_name = calibration_name
        """``default`` (the bundle's holdout calibration) or a site calibration's name."""
        self.calibration_entry = calibration_entry
        """The stored calibration of the served configuration: method, threshold, the data it
        was fitted on and its cross-fitted validation (None when uncalibrated)."""
        self.ood = ood or OODCriteria()
        """What the bundle knows of its training inputs (intensity reference, ages), for the
        out-of-distribution check of every image it predicts."""

    @property
    def backend(self) -> Backend:
        """``torch`` or ``onnx``: what computes the logits."""
        return "torch" if self.runner is None else "onnx"

    @property
    def models(self) -> list[torch.nn.Module]:
        """The PyTorch members. With the onnx backend they are loaded on first use (Grad-CAM)."""
        if self._models is None:
            if self._load_models is None:
                raise BundleError("this predictor has no PyTorch weights to explain with")
            self._models = self._load_models()
        return self._models

    @property
    def calibrated(self) -> bool:
        """Whether the probabilities are calibrated for the served configuration."""
        return self.calibrator is not None

    @classmethod
    def from_run(
        cls,
        run_dir: str | Path | Bundle,
        *,
        members: Members = "auto",
        calibration: str | None = None,
        device: str = "auto",
        backend: Backend = "torch",
        onnx_path: str | Path | None = None,
    ) -> Predictor:
        """Load a bundle written by ``xraycls train``.

        Args:
            run_dir: The run folder (or an already read :class:`Bundle`).
            members: ``folds`` (the fold ensemble, logits averaged), ``refit``
                (``weights.safetensors``) or ``auto``: the bundle's default (the fold ensemble).
            calibration: None for the bundle's own calibration (fitted on its holdout), or the
                name of a site calibration (``xraycls calibrate RUN --on CSV --name NAME``).
            device: ``auto``, ``cpu``, ``cuda``, ... (with the onnx backend: where Grad-CAM's
                PyTorch weights go; the ONNX graph runs on the CPU).
            backend: ``torch`` or ``onnx`` (the export ``xraycls export RUN --format onnx``
                wrote for this configuration, checked against the bundle's weights).
            onnx_path: The ONNX file (default ``RUN/export/<configuration>.onnx``).

        Raises:
            BundleError: A file is missing or inconsistent; the message names it.
            ExportError: The onnx backend's file is missing, unloadable or of other weights.
            ConfigError: The device is not available.
        """
        from xraycls.models import create_model

        bundle = run_dir if isinstance(run_dir, Bundle) else Bundle.read(run_dir)
        configuration = bundle.default_members() if members == "auto" else members
        files = bundle.weights(configuration)
        calibrator, threshold, entry = load_configuration(
            bundle, configuration, calibration=calibration
        )
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r}: use one of {', '.join(BACKENDS)}")
        dev = resolve_device(device)

        def load_models() -> list[torch.nn.Module]:
            models = []
            for f in files:
                model = create_model(
                    bundle.model, num_classes=len(bundle.classes), image_size=bundle.image_size
                )
                try:
                    model.load_state_dict(load_weights(f))
                except (RuntimeError, OSError) as e:  # shape mismatch, corrupt safetensors
                    raise BundleError(f"{f}: does not hold {bundle.model} weights ({e})") from e
                models.append(model.to(dev).eval())
            return models

        runner = None
        if backend == "onnx":
            from xraycls.inference.onnx_backend import open_export

            runner = open_export(bundle, configuration, onnx_path)
        return cls(
            [] if runner is not None else load_models(),
            classes=list(bundle.classes),
            prep=bundle.preprocessing,
            normalization=bundle.normalization,
            calibrator=calibrator,
            threshold=threshold,
            device=dev,
            run_dir=bundle.path,
            configuration=configuration,
            calibration_name=calibration or "default",
            calibration_entry=entry,
            ood=OODCriteria(bundle.intensity_reference(), bundle.age_range),
            runner=runner,
            load_models=load_models,
            multilabel=bundle.multilabel,
        )

    def to_tensor(self, pixels: list[np.ndarray]) -> torch.Tensor:
        """Preprocessed HxW [0, 1] images -> a normalised N x 3 x H x W batch."""
        return to_model_input(np.stack(pixels), self.normalization)

    @torch.no_grad()
    def logits(self, batch: torch.Tensor) -> np.ndarray:
        """Members x N x C logits for a normalised batch."""
        if self.runner is not None:
            return self.runner(batch.cpu().numpy()).astype(np.float32, copy=False)
        batch = batch.to(self.device)
        return np.stack([m(batch).float().cpu().numpy() for m in self.models])

    def predict(self, pixels: list[np.ndarray]) -> list[Prediction]:
        """Predict preprocessed images (HxW float32 in [0, 1] at the bundle's size)."""
        if not pixels:
            return []
        member_logits = self.logits(self.to_tensor(pixels))
        mean_logits = member_logits.mean(0)
        raw = sigmoid(mean_logits) if self.multilabel else softmax(mean_logits)
        probs = self._calibrate(mean_logits)
        members = np.stack([self._calibrate(z) for z in member_logits], axis=1)
        if self.multilabel:
            t = self.finding_thresholds
            return [
                Prediction(
                    probs[i],
                    raw[i],
                    members[i],
                    self._findings_text(probs[i] >= t),
                    None,
                    calibrated=self.calibrated,
                    thresholds=t,
                    decisions=probs[i] >= t,
                )
                for i in range(len(pixels))
            ]
        return [
            Prediction(
                probs[i],
                raw[i],
                members[i],
                self._decide(probs[i]),
                self.threshold,
                calibrated=self.calibrated,
            )
            for i in range(len(pixels))
        ]

    def predict_files(
        self, paths: list[str | Path], *, cache: ImageCache | None = None
    ) -> list[Prediction | ImageReadError]:
        """Read, preprocess and predict files; a bad file yields its error, not an exception."""
        results: list[Prediction | ImageReadError] = []
        ok: list[int] = []
        pixels: list[np.ndarray] = []
        for i, path in enumerate(paths):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    pixels.append(preprocess_file(path, self.prep, cache=cache).pixels)
                ok.append(i)
                results.append(None)  # type: ignore[arg-type]
            except ImageReadError as e:
                results.append(e)
        for i, pred in zip(ok, self.predict(pixels), strict=True):
            results[i] = pred
        return results

    @property
    def finding_thresholds(self) -> np.ndarray:
        """Multi-label: each finding's stored operating threshold (0.5 where none is stored:
        an uncalibrated bundle)."""
        cal = self.calibrator
        if isinstance(cal, FindingCalibration):
            return np.where(np.isfinite(cal.thresholds), cal.thresholds, 0.5)
        return np.full(len(self.classes), 0.5)

    def _findings_text(self, present: np.ndarray) -> str:
        names = [c for c, d in zip(self.classes, present, strict=True) if d]
        return "|".join(names) if names else NO_FINDING

    def _calibrate(self, logits: np.ndarray) -> np.ndarray:
        if self.calibrator is None:
            return sigmoid(logits) if self.multilabel else softmax(logits)
        return self.calibrator.predict_proba(logits)

    def _decide(self, probs: np.ndarray) -> str:
        if len(self.classes) == 2 and self.threshold is not None:
            return self.classes[1] if probs[1] >= self.threshold else self.classes[0]
        return self.classes[int(np.argmax(probs))]

    def fingerprint(self) -> dict[str, str]:
        """The bundle files' fingerprint (:meth:`Bundle.fingerprint`); empty for an in-memory
        model."""
        return Bundle.read(self.run_dir).fingerprint() if self.run_dir else {}

    def describe(self) -> dict[str, Any]:
        """Identity of the loaded bundle (for reports and the viewer)."""
        out: dict[str, Any] = {
            "run": str(self.run_dir) if self.run_dir else None,
            "members": self.n_members,
            "classes": self.classes,
            "image_size": self.prep.image_size,
            "configuration": self.configuration,
            "calibration": None if self.calibrator is None else self.calibrator.method,
            "calibration_name": self.calibration_name,
            "threshold": self.threshold,
            "task": "multilabel" if self.multilabel else "multiclass",
        }
        if self.runner is not None:  # absent for torch: older results files stay resumable
            out["backend"] = "onnx"
            out["onnx"] = self.runner.path.name
        return out
