"""Probability calibration on logits: temperature scaling, Platt scaling, isotonic regression.

A calibrator must be fitted on out-of-fold (OOF) logits -- ``oof_predictions.csv`` of a run --
and never on the data it is then scored on: fitted and scored on the same cases, it looks
better calibrated than it is. Fit once, save it in the run bundle as ``calibration.json`` and
apply it unchanged to new predictions.

Conventions follow :mod:`xraycls.training.crossval`: logits are N x C with C >= 2 and a softmax on top;
binary problems have two classes, the last one positive. A single-logit binary model (N or
N x 1 logits) and multi-label models (N x K logits, N x K 0/1 labels, one sigmoid per label)
are handled by the sigmoid variant of temperature scaling.

* :class:`TemperatureScaling` (Guo et al. 2017): one scalar T > 0, ``softmax(logits / T)``.
  It changes confidence but never the predicted class, and it works for any C.
* :class:`PlattScaling` (Platt 1999; binary only): ``sigmoid(a * z + b)`` on the margin
  ``z = logit_pos - logit_neg``.
* :class:`VectorScaling` (Guo et al. 2017; three or more classes): ``softmax(a * z + b)``, a
  scale and an intercept per class.
* :class:`IsotonicCalibration` (Zadrozny & Elkan 2002; binary only): a monotone step map of
  the positive-class probability. Flexible, but it needs more data and creates ties.
"""

from __future__ import annotations

import json
import math
import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from scipy.special import expit, log_expit, log_softmax, softmax
from sklearn.exceptions import ConvergenceWarning
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

from xraycls.evaluation.metrics import nll
from xraycls.io.files import write_text_atomic

FORMAT = 1
"""Version of the ``to_dict`` / ``calibration.json`` layout."""

Method = Literal["temperature", "platt", "vector", "isotonic"]


class Calibrator(ABC):
    """Maps logits to calibrated class probabilities.

    ``fit`` learns the map from (out-of-fold) logits and labels; ``predict_proba`` applies it;
    ``to_dict`` / :func:`calibrator_from_dict` round-trip it through JSON exactly.
    """

    method: ClassVar[str]

    @abstractmethod
    def fit(self, logits: np.ndarray, labels: np.ndarray) -> Self:
        """Fit on out-of-fold logits and their labels; returns ``self``."""

    @abstractmethod
    def predict_proba(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities: N x C rows summing to 1.

        A multi-label sigmoid calibrator returns N x K independent probabilities instead.
        """

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe parameters and fit diagnostics, with ``method`` and ``format`` keys."""

    @classmethod
    @abstractmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        """The inverse of :meth:`to_dict`."""

    def _require_fitted(self, fitted: bool) -> None:
        if not fitted:
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit() first")


class TemperatureScaling(Calibrator):
    """One temperature T shared by all classes: ``softmax(logits / T)`` or ``sigmoid(logits / T)``.

    T is found by minimising the mean negative log-likelihood over ``log T`` (which keeps T > 0
    and makes the search scale-free) with a bounded Brent search on ``T in [1e-2, 1e2]``. The NLL
    is convex in 1/T, hence unimodal in log T, so the 1-D search finds the global minimum. Should
    the result not beat T = 1 on the fitting data, T = 1 is kept and ``identity_fallback`` is set.

    Args:
        kind: ``"softmax"`` for N x C logits (C >= 2) and integer labels; ``"sigmoid"`` for a
            single-logit binary model (N or N x 1 logits, 0/1 labels; probabilities come back as
            N x 2 ``[1 - p, p]``) or multi-label logits (N x K logits and 0/1 labels; N x K
            independent probabilities).

    Attributes:
        temperature: The fitted T (1.0 before fitting).
        converged: The optimiser reported success and the minimum lies inside the bracket.
        nll_before: Mean NLL of the fitting data at T = 1.
        nll_after: Mean NLL at the fitted T.
        identity_fallback: The search did not improve on T = 1, so T = 1 was kept.
        n: Number of fitting samples.
    """

    method = "temperature"
    LOG_T_BOUNDS = (math.log(1e-2), math.log(1e2))

    def __init__(self, *, kind: Literal["softmax", "sigmoid"] = "softmax") -> None:
        if kind not in ("softmax", "sigmoid"):
            raise ValueError(f"kind must be 'softmax' or 'sigmoid', got {kind!r}")
        self.kind = kind
        self.temperature = 1.0
        self.converged = False
        self.nll_before = math.nan
        self.nll_after = math.nan
        self.identity_fallback = False
        self.n = 0

    def fit(self, logits: np.ndarray, labels: np.ndarray) -> Self:
        """Fit T on out-of-fold logits and their labels."""
        if self.kind == "softmax":
            z, y = _softmax_inputs(logits, labels)
            rows = np.arange(len(y))

            def objective(log_t: float) -> float:
                return float(-log_softmax(z * math.exp(-log_t), axis=1)[rows, y].mean())

        else:
            z, y = _sigmoid_inputs(logits, labels)

            def objective(log_t: float) -> float:
                s = z * math.exp(-log_t)
                # log p(y) = y * log sigmoid(s) + (1 - y) * log sigmoid(-s), without overflow.
                return float(-(y * log_expit(s) + (1 - y) * log_expit(-s)).mean())

        lo, hi = self.LOG_T_BOUNDS
        res = minimize_scalar(objective, bounds=(lo, hi), method="bounded", options={"xatol": 1e-8})
        log_t, nll_fit = float(res.x), float(res.fun)
        # A unimodal objective has its minimum inside the bracket only if it beats both ends;
        # otherwise T ran to a bound, or the NLL underflowed to a flat 0 (separable data).
        self.converged = bool(res.success) and nll_fit < min(objective(lo), objective(hi))
        if not self.converged:
            warnings.warn(
                f"temperature search did not converge (T = {math.exp(log_t):.4g}, bracket "
                f"[{math.exp(lo):.2g}, {math.exp(hi):.2g}]): {res.message}",
                ConvergenceWarning,
                stacklevel=2,
            )
        self.nll_before = objective(0.0)
        self.identity_fallback = not nll_fit < self.nll_before
        if self.identity_fallback:
            log_t, nll_fit = 0.0, self.nll_before
        self.temperature = math.exp(log_t)
        self.nll_after = nll_fit
        self.n = len(y)
        return self

    def predict_proba(self, logits: np.ndarray) -> np.ndarray:
        """Probabilities of ``logits / T`` (see the class docstring for the shapes)."""
        self._require_fitted(self.n > 0)
        z = np.asarray(logits, dtype=np.float64) / self.temperature
        if self.kind == "softmax":
            return softmax(_check_2d(z, min_cols=2), axis=1)
        if z.ndim == 1 or z.shape[1] == 1:
            return _two_column(expit(z.reshape(-1)))
        return expit(z)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "format": FORMAT,
            "kind": self.kind,
            "temperature": self.temperature,
            "converged": self.converged,
            "nll_before": self.nll_before,
            "nll_after": self.nll_after,
            "identity_fallback": self.identity_fallback,
            "n": self.n,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        cal = cls(kind=d["kind"])
        cal.temperature = float(d["temperature"])
        cal.converged = bool(d["converged"])
        cal.nll_before = float(d["nll_before"])
        cal.nll_after = float(d["nll_after"])
        cal.identity_fallback = bool(d["identity_fallback"])
        cal.n = int(d["n"])
        return cal


class PlattScaling(Calibrator):
    """Binary only: ``p = sigmoid(a * z + b)`` on the logit margin ``z = logit_pos - logit_neg``.

    An unpenalised logistic regression of the label on ``z``. With two classes
    ``softmax(logits)[:, 1] == sigmoid(z)``, so ``a = 1, b = 0`` is the identity; unlike
    temperature scaling, ``b`` can also correct a shift in prevalence. On perfectly separated
    data the unpenalised optimum lies at infinity: the solver stops at some large slope once
    the gradient is negligible, and the calibrated probabilities are close to 0 and 1.

    Attributes:
        a: Slope.
        b: Intercept.
        converged: The solver met its tolerance before its iteration limit (scikit-learn
            also warns otherwise).
        nll_before: Mean NLL of the fitting data before calibration.
        nll_after: Mean NLL after.
        n: Number of fitting samples.
    """

    method = "platt"

    def __init__(self) -> None:
        self.a = 1.0
        self.b = 0.0
        self.converged = False
        self.nll_before = math.nan
        self.nll_after = math.nan
        self.n = 0

    def fit(self, logits: np.ndarray, labels: np.ndarray) -> Self:
        """Fit ``a, b`` on out-of-fold logits and their 0/1 labels."""
        z, y = _binary_inputs(logits, labels, self.method)
        lr = LogisticRegression(C=np.inf, max_iter=1000).fit(z[:, None], y)  # C=inf: no penalty
        self.converged = bool(lr.n_iter_[0] < lr.max_iter)
        self.a, self.b = float(lr.coef_[0, 0]), float(lr.intercept_[0])
        self.nll_before = nll(_two_column(expit(z)), y)
        self.nll_after = nll(_two_column(expit(self.a * z + self.b)), y)
        self.n = len(y)
        return self

    def predict_proba(self, logits: np.ndarray) -> np.ndarray:
        """N x 2 ``[1 - p, p]``."""
        self._require_fitted(self.n > 0)
        return _two_column(expit(self.a * _margin(logits, self.method) + self.b))

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "format": FORMAT,
            "a": self.a,
            "b": self.b,
            "converged": self.converged,
            "nll_before": self.nll_before,
            "nll_after": self.nll_after,
            "n": self.n,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        cal = cls()
        cal.a, cal.b = float(d["a"]), float(d["b"])
        cal.converged = bool(d["converged"])
        cal.nll_before = float(d["nll_before"])
        cal.nll_after = float(d["nll_after"])
        cal.n = int(d["n"])
        return cal


class IsotonicCalibration(Calibrator):
    """Binary only: isotonic regression of the label on the positive-class probability.

    scikit-learn's ``IsotonicRegression(out_of_bounds="clip")`` on ``p = softmax(logits)[:, 1]``;
    the fitted step function is kept as its thresholds and applied with linear interpolation
    between them (what scikit-learn's ``predict`` does), clipped outside. Calibrated
    probabilities can be exactly 0 or 1, and distinct scores can map to the same probability.

    Attributes:
        x_thresholds: Increasing input probabilities of the fitted map.
        y_thresholds: Calibrated probabilities at ``x_thresholds`` (non-decreasing).
        nll_before: Mean NLL of the fitting data before calibration.
        nll_after: Mean NLL after (scikit-learn clips 0/1 probabilities for it).
        n: Number of fitting samples.
    """

    method = "isotonic"

    def __init__(self) -> None:
        self.x_thresholds = np.zeros(0)
        self.y_thresholds = np.zeros(0)
        self.nll_before = math.nan
        self.nll_after = math.nan
        self.n = 0

    def fit(self, logits: np.ndarray, labels: np.ndarray) -> Self:
        """Fit the monotone map on out-of-fold logits and their 0/1 labels."""
        z, y = _binary_inputs(logits, labels, self.method)
        p = expit(z)
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
        iso.fit(p, y)
        self.x_thresholds = np.asarray(iso.X_thresholds_, dtype=np.float64)
        self.y_thresholds = np.asarray(iso.y_thresholds_, dtype=np.float64)
        self.n = len(y)
        self.nll_before = nll(_two_column(p), y)
        self.nll_after = nll(self.predict_proba(logits), y)
        return self

    def predict_proba(self, logits: np.ndarray) -> np.ndarray:
        """N x 2 ``[1 - p, p]``."""
        self._require_fitted(self.n > 0)
        p = expit(_margin(logits, self.method))
        # np.interp holds the end values outside the thresholds: out_of_bounds="clip".
        return _two_column(np.interp(p, self.x_thresholds, self.y_thresholds))

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "format": FORMAT,
            "x_thresholds": self.x_thresholds.tolist(),
            "y_thresholds": self.y_thresholds.tolist(),
            "nll_before": self.nll_before,
            "nll_after": self.nll_after,
            "n": self.n,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        cal = cls()
        cal.x_thresholds = np.asarray(d["x_thresholds"], dtype=np.float64)
        cal.y_thresholds = np.asarray(d["y_thresholds"], dtype=np.float64)
        if cal.x_thresholds.shape != cal.y_thresholds.shape or cal.x_thresholds.size == 0:
            raise ValueError("isotonic calibration needs equally long, non-empty thresholds")
        cal.nll_before = float(d["nll_before"])
        cal.nll_after = float(d["nll_after"])
        cal.n = int(d["n"])
        return cal


class VectorScaling(Calibrator):
    """Multi-class: ``softmax(a * z + b)`` with one scale ``a_c`` and one bias ``b_c`` per class.

    Guo et al. (2017)'s vector scaling: temperature scaling with a per-class scale, plus the
    intercepts temperature scaling lacks. Training with class weights (or on a resampled set)
    shifts the logits' intercepts; ``b`` undoes that shift, which no temperature can. ``b_0`` is
    fixed at 0 (softmax ignores a common shift). Fitted by L-BFGS on the mean NLL with a tiny
    ridge (1e-4) towards the identity, so that separable data keep a finite solution.

    Attributes:
        a: Per-class scales.
        b: Per-class biases (``b[0] == 0``).
        converged: The optimiser reported success.
        nll_before: Mean NLL of the fitting data at the identity.
        nll_after: Mean NLL after.
        n: Number of fitting samples.
    """

    method = "vector"
    RIDGE = 1e-4

    def __init__(self) -> None:
        self.a = np.ones(0)
        self.b = np.zeros(0)
        self.converged = False
        self.nll_before = math.nan
        self.nll_after = math.nan
        self.n = 0

    def fit(self, logits: np.ndarray, labels: np.ndarray) -> Self:
        """Fit ``a, b`` on held-out logits (N x C) and integer labels."""
        z, y = _softmax_inputs(logits, labels)
        n, c = z.shape
        onehot = np.zeros_like(z)
        onehot[np.arange(n), y] = 1.0

        def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
            a, b = theta[:c], np.concatenate([[0.0], theta[c:]])
            s = z * a + b
            logp = log_softmax(s, axis=1)
            loss = -float(np.sum(logp * onehot)) / n
            loss += self.RIDGE * float(np.sum((a - 1) ** 2) + np.sum(b**2))
            g = (np.exp(logp) - onehot) / n  # dL/ds
            grad_a = np.sum(g * z, axis=0) + 2 * self.RIDGE * (a - 1)
            grad_b = np.sum(g, axis=0)[1:] + 2 * self.RIDGE * b[1:]
            return loss, np.concatenate([grad_a, grad_b])

        theta0 = np.concatenate([np.ones(c), np.zeros(c - 1)])
        res = minimize(objective, theta0, jac=True, method="L-BFGS-B")
        self.converged = bool(res.success)
        self.a, self.b = res.x[:c], np.concatenate([[0.0], res.x[c:]])
        self.nll_before = float(-log_softmax(z, axis=1)[np.arange(n), y].mean())
        self.nll_after = float(-log_softmax(z * self.a + self.b, axis=1)[np.arange(n), y].mean())
        self.n = n
        return self

    def predict_proba(self, logits: np.ndarray) -> np.ndarray:
        """N x C probabilities."""
        self._require_fitted(self.n > 0)
        z = _check_2d(np.asarray(logits, dtype=np.float64), min_cols=len(self.a))
        return softmax(z * self.a + self.b, axis=1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "format": FORMAT,
            "a": self.a.tolist(),
            "b": self.b.tolist(),
            "converged": self.converged,
            "nll_before": self.nll_before,
            "nll_after": self.nll_after,
            "n": self.n,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        cal = cls()
        cal.a = np.asarray(d["a"], dtype=np.float64)
        cal.b = np.asarray(d["b"], dtype=np.float64)
        if cal.a.shape != cal.b.shape or cal.a.ndim != 1 or cal.a.size < 2:
            raise ValueError("vector scaling needs equally long scale and bias vectors")
        cal.converged = bool(d["converged"])
        cal.nll_before = float(d["nll_before"])
        cal.nll_after = float(d["nll_after"])
        cal.n = int(d["n"])
        return cal


CALIBRATORS: dict[str, type[Calibrator]] = {
    c.method: c for c in (TemperatureScaling, PlattScaling, VectorScaling, IsotonicCalibration)
}
BINARY_ONLY = frozenset({"platt", "isotonic"})
MULTICLASS_ONLY = frozenset({"vector"})


def candidate_methods(n_classes: int) -> list[str]:
    """What ``method: auto`` chooses among: temperature (no intercept) and the calibrator with
    intercepts for the task (Platt for two classes, vector scaling for more). Isotonic is left
    out of the automatic choice: it needs more data and creates ties."""
    return ["temperature", "platt" if n_classes == 2 else "vector"]


def fit_calibrator(method: Method, logits: np.ndarray, labels: np.ndarray) -> Calibrator:
    """Fit a calibrator of ``method`` on out-of-fold logits and labels.

    ``"temperature"`` picks the softmax variant for N x C logits with integer labels, and the
    sigmoid variant for single-logit (N or N x 1) or multi-label (N x K labels) models.

    Raises:
        ValueError: Unknown method, or a binary-only method (``platt``, ``isotonic``) on more
            than two classes.
    """
    if method not in CALIBRATORS:
        raise ValueError(f"unknown calibration method {method!r}; valid: {sorted(CALIBRATORS)}")
    logits, labels = np.asarray(logits), np.asarray(labels)
    if method in BINARY_ONLY and logits.ndim == 2 and logits.shape[1] > 2:
        raise ValueError(
            f"{method} calibration is binary-only, but the logits have {logits.shape[1]} "
            "classes; use 'temperature' or 'vector' for multi-class models"
        )
    if method in MULTICLASS_ONLY and (logits.ndim != 2 or logits.shape[1] < 3):
        raise ValueError(f"{method} scaling is for three or more classes; use 'platt' for two")
    if method == "temperature":
        single = logits.ndim == 1 or logits.shape[1] == 1
        kind = "sigmoid" if single or labels.ndim == 2 else "softmax"
        return TemperatureScaling(kind=kind).fit(logits, labels)
    return CALIBRATORS[method]().fit(logits, labels)


def calibrator_from_dict(d: dict[str, Any]) -> Calibrator:
    """Rebuild a calibrator from :meth:`Calibrator.to_dict` output (e.g. read from JSON)."""
    if d.get("format") != FORMAT:
        raise ValueError(f"unsupported calibration format {d.get('format')!r} (expected {FORMAT})")
    method = d.get("method")
    if method not in CALIBRATORS:
        raise ValueError(f"unknown calibration method {method!r}; valid: {sorted(CALIBRATORS)}")
    return CALIBRATORS[method].from_dict(d)


def save_calibration(path: str | Path, calibrator: Calibrator, **extra: Any) -> Path:
    """Write ``calibrator`` (and JSON-safe ``extra`` metadata) to ``path``, atomically.

    The file, conventionally ``<run>/calibration.json``, is written to a temporary file beside
    it and moved into place, so a reader never sees half a file. Write strict JSON: NaN or
    infinity in ``extra`` is refused.

    Args:
        path: Destination file.
        calibrator: A fitted calibrator.
        **extra: Provenance to store beside it, e.g. ``classes=[...]``,
            ``fitted_on="oof_predictions.csv"``.

    Returns:
        ``path``.
    """
    if "calibrator" in extra:
        raise ValueError("'calibrator' is reserved")
    text = json.dumps({"calibrator": calibrator.to_dict(), **extra}, indent=2, allow_nan=False)
    return write_text_atomic(path, text + "\n")


def load_calibration(path: str | Path) -> tuple[Calibrator, dict[str, Any]]:
    """Read a file written by :func:`save_calibration`.

    Returns:
        The calibrator and the ``extra`` metadata saved with it.
    """
    data = json.loads(Path(path).read_text())
    return calibrator_from_dict(data.pop("calibrator")), data


def _check_2d(z: np.ndarray, *, min_cols: int) -> np.ndarray:
    if z.ndim != 2 or z.shape[1] < min_cols:
        raise ValueError(f"need N x C logits with C >= {min_cols}, got shape {z.shape}")
    return z


def _check_finite(z: np.ndarray, y: np.ndarray) -> None:
    if len(z) == 0 or len(z) != len(y):
        raise ValueError(f"need N > 0 logits and N labels, got {len(z)} and {len(y)}")
    if not np.isfinite(z).all():
        raise ValueError("logits contain NaN or infinity")


def _softmax_inputs(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = _check_2d(np.asarray(logits, dtype=np.float64), min_cols=2)
    y = np.asarray(labels)
    _check_finite(z, y)
    if (
        y.ndim != 1
        or not np.issubdtype(y.dtype, np.integer)
        or y.min() < 0
        or y.max() >= z.shape[1]
    ):
        raise ValueError(f"labels must be N integers in range({z.shape[1]})")
    return z, y.astype(np.int64)


def _sigmoid_inputs(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels)
    if z.ndim == 2 and z.shape[1] == 1:
        z = z[:, 0]
    if y.ndim == 2 and y.shape[1] == 1 and z.ndim == 1:
        y = y[:, 0]
    if z.shape != y.shape:
        raise ValueError(
            f"sigmoid logits and labels must have the same shape: {z.shape} vs {y.shape}"
        )
    _check_finite(z, y)
    if not np.isin(y, (0, 1)).all():
        raise ValueError("sigmoid labels must be 0/1")
    return z, y.astype(np.float64)


def _margin(logits: np.ndarray, method: str) -> np.ndarray:
    """The positive-class logit margin: ``l1 - l0`` for two logits, the logit itself for one."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim == 1:
        return z
    if z.ndim == 2 and z.shape[1] == 1:
        return z[:, 0]
    if z.ndim == 2 and z.shape[1] == 2:
        return z[:, 1] - z[:, 0]
    raise ValueError(f"{method} calibration is binary-only; got logits of shape {z.shape}")


def _binary_inputs(
    logits: np.ndarray, labels: np.ndarray, method: str
) -> tuple[np.ndarray, np.ndarray]:
    z = _margin(logits, method)
    y = np.asarray(labels)
    _check_finite(z, y)
    if y.ndim != 1 or not np.isin(y, (0, 1)).all() or len(np.unique(y)) != 2:
        raise ValueError(f"{method} calibration needs N 0/1 labels with both classes present")
    return z, y.astype(np.int64)


def _two_column(p: np.ndarray) -> np.ndarray:
    return np.column_stack([1.0 - p, p])
