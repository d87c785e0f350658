"""A loaded run bundle that turns images into calibrated predictions.

The same :class:`Predictor` serves ``xraycls evaluate``, batch scoring and the viewer. Everything
that decides a prediction comes from the bundle, never from code defaults: backbone and input
size (``config.yaml``), classes (``labels.json``), preprocessing and normalisation
(``bundle.json``), weights (safetensors), calibration and operating threshold
(``calibration.json``).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from xraycls.bundle import BundleError
from xraycls.calibrate import Calibrator, load_calibration
from xraycls.checkpoint import load_weights
from xraycls.config import load_config
from xraycls.engine import resolve_device
from xraycls.errors import ImageReadError
from xraycls.preprocess import ImageCache, Preprocessing, preprocess_file


@dataclass
class Prediction:
    """One image's result."""

    probs: np.ndarray
    """Calibrated class probabilities (raw softmax when the bundle has no calibration)."""
    raw_probs: np.ndarray
    """Uncalibrated softmax of the ensemble-mean logits."""
    member_probs: np.ndarray
    """Calibrated probabilities of each ensemble member (members x classes): their spread is
    the honest uncertainty to show."""
    predicted: str
    """The decision: the positive class at or above the stored threshold (binary), else argmax."""
    threshold: float | None


class Predictor:
    """Weights, preprocessing, labels, calibration and threshold of one run bundle."""

    def __init__(
        self,
        models: list[torch.nn.Module],
        *,
        classes: list[str],
        prep: Preprocessing,
        normalization: tuple[list[float], list[float]],
        calibrator: Calibrator | None,
        threshold: float | None,
        device: torch.device,
        run_dir: Path | None = None,
    ) -> None:
        self.models = models
        self.classes = classes
        self.prep = prep
        self.calibrator = calibrator
        self.threshold = threshold
        self.device = device
        self.run_dir = run_dir
        self._mean = torch.tensor(normalization[0]).view(1, 3, 1, 1)
        self._std = torch.tensor(normalization[1]).view(1, 3, 1, 1)

    @classmethod
    def from_run(
        cls,
        run_dir: str | Path,
        *,
        members: Literal["auto", "refit", "folds"] = "auto",
        device: str = "auto",
    ) -> Predictor:
        """Load a bundle written by ``xraycls train``.

        Args:
            run_dir: The run folder.
            members: ``refit`` (``weights.safetensors``), ``folds`` (the fold ensemble,
                logits averaged) or ``auto`` (refit when present, else folds).
            device: ``auto``, ``cpu``, ``cuda``, ...

        Raises:
            BundleError: A file is missing or inconsistent; the message names it.
        """
        from xraycls.models import create_model

        run = Path(run_dir)
        try:
            cfg = load_config(run / "config.yaml")
            meta = json.loads((run / "bundle.json").read_text())
            classes = json.loads((run / "labels.json").read_text())["classes"]
        except (OSError, ValueError, KeyError) as e:
            raise BundleError(f"{run}: not a complete run bundle ({e})") from e
        refit = run / "weights.safetensors"
        if members == "refit" or (members == "auto" and refit.exists()):
            files = [refit]
        else:
            files = [run / f for f in meta.get("fold_weights", [])]
        missing = [str(f) for f in files if not f.exists()]
        if not files or missing:
            raise BundleError(f"{run}: weights missing: {', '.join(missing) or 'none listed'}")
        dev = resolve_device(device)
        models = []
        for f in files:
            model = create_model(
                cfg.model.name, num_classes=len(classes), image_size=cfg.model.image_size
            )
            model.load_state_dict(load_weights(f))
            models.append(model.to(dev).eval())
        p = meta["preprocessing"]
        window = tuple(p["window"]) if isinstance(p["window"], list) else p["window"]
        prep = Preprocessing(
            image_size=p["image_size"],
            resize=p["resize"],
            window=window,
            percentiles=tuple(p["percentiles"]),
        )
        calibrator, threshold = None, None
        if (run / "calibration.json").exists():
            calibrator, extra = load_calibration(run / "calibration.json")
            threshold = (extra.get("threshold") or {}).get("threshold")
        norm = meta["normalization"]
        return cls(
            models,
            classes=classes,
            prep=prep,
            normalization=(norm["mean"], norm["std"]),
            calibrator=calibrator,
            threshold=threshold,
            device=dev,
            run_dir=run,
        )

    def to_tensor(self, pixels: list[np.ndarray]) -> torch.Tensor:
        """Preprocessed HxW [0, 1] images -> a normalised N x 3 x H x W batch."""
        x = torch.from_numpy(np.stack(pixels)).unsqueeze(1).expand(-1, 3, -1, -1)
        return (x - self._mean) / self._std

    @torch.no_grad()
    def logits(self, batch: torch.Tensor) -> np.ndarray:
        """Members x N x C logits for a normalised batch."""
        batch = batch.to(self.device)
        return np.stack([m(batch).float().cpu().numpy() for m in self.models])

    def predict(self, pixels: list[np.ndarray]) -> list[Prediction]:
        """Predict preprocessed images (HxW float32 in [0, 1] at the bundle's size)."""
        if not pixels:
            return []
        member_logits = self.logits(self.to_tensor(pixels))
        mean_logits = member_logits.mean(0)
        raw = _softmax(mean_logits)
        probs = self._calibrate(mean_logits)
        members = np.stack([self._calibrate(z) for z in member_logits], axis=1)
        return [
            Prediction(probs[i], raw[i], members[i], self._decide(probs[i]), self.threshold)
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

    def _calibrate(self, logits: np.ndarray) -> np.ndarray:
        if self.calibrator is None:
            return _softmax(logits)
        return self.calibrator.predict_proba(logits)

    def _decide(self, probs: np.ndarray) -> str:
        if len(self.classes) == 2 and self.threshold is not None:
            return self.classes[1] if probs[1] >= self.threshold else self.classes[0]
        return self.classes[int(np.argmax(probs))]

    def describe(self) -> dict[str, Any]:
        """Identity of the loaded bundle (for reports and the viewer)."""
        return {
            "run": str(self.run_dir) if self.run_dir else None,
            "members": len(self.models),
            "classes": self.classes,
            "image_size": self.prep.image_size,
            "calibration": None if self.calibrator is None else self.calibrator.method,
            "threshold": self.threshold,
        }


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)
