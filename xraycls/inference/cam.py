"""Grad-CAM family heatmaps for every backbone and fold ensemble, and overlays on the image.

The CAM methods are pytorch-grad-cam's classes (``GradCAM``, ``GradCAMPlusPlus``, ``HiResCAM``,
``EigenCAM``, ``ScoreCAM``): their per-layer weighting, ReLU, min-max scaling and multi-layer
averaging are used as they are. What runs the model around them is ours, because the library's
recorder does not fit a 1024² ensemble:

- **The ensemble is explained, not one member.** The members' logits are averaged in one module
  and every member's target layer is a CAM layer; the library averages the per-layer maps. Each
  member's layer is given the gradient of k times the ensemble's mean logit, i.e. of its own
  logit, so the ensemble's map is the average of the maps the members give alone.
- **Gradients stop at the target layer.** The forward runs under ``no_grad`` up to each member's
  target layer, whose output is swapped for a fresh leaf; only what follows it is recorded, and
  ``torch.autograd.grad`` asks for the leaves' gradients alone. So nothing below the target layer
  keeps activations for a backward, no parameter ever gets a ``.grad``, and gradients are matched
  to layers by position (the library matches them by the order its backward hooks fire, which
  nothing guarantees for parallel ensemble members).
- **Hooks live only inside ``explain``** and record only the calling thread's forward, so a
  ``Predictor`` shared with other threads (the viewer) predicts undisturbed meanwhile.
- **ScoreCAM masks the input a few channels at a time.** The library builds every masked copy at
  once: channels x 3 x H x W floats, 25 GB for ResNet-50 at 1024².
- **The explained score is the class logit minus the mean logit** (:class:`CenteredLogitTarget`),
  not the bare logit. Softmax ignores anything added to every logit, so a model may put its
  evidence for "pneumonia" into lowering the "normal" logit; the bare logit's map then shows
  whatever the shared part does. For two classes the centred logit is half the log-odds, the
  quantity calibration and the threshold act on. (On one of four toy ViTs trained to find a
  bright square, the bare logit's maps missed the square on 16 of 16 images, the centred
  logit's hit it on 16 of 16.)
- **EigenCAM picks the sign of its principal component** so that the larger extreme is positive
  (the correction of Seg-Eigen-CAM, shipped in the same package): an SVD's sign is arbitrary, so
  plain EigenCAM may light up the background instead of the object, image by image.

Why one module of ~630 lines: the recorder, the ensemble wrapper, the gradient cut and the
ScoreCAM/EigenCAM adjustments are one mechanism around pytorch-grad-cam's classes; each part only
makes sense with the others.

Heatmaps are float32 in [0, 1] in model-input coordinates (the square, letterboxed image);
:meth:`CamResult.to_original` maps one back onto the original image's pixel grid.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache, partial
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from xraycls.models.registry import validate_image_size

if TYPE_CHECKING:
    from pytorch_grad_cam.base_cam import BaseCAM

    from xraycls.inference.predictor import Predictor
    from xraycls.io.preprocess import Letterbox
    from xraycls.models.base import XrayClassifier

CAM_METHODS: tuple[str, ...] = ("gradcam", "gradcam++", "hirescam", "eigencam", "scorecam")
"""Names accepted by ``method``; ``eigencam`` is class-agnostic (it ignores the target)."""

SCORECAM_BATCH_SIZE = 8
"""Masked copies of the input per forward in ScoreCAM (one forward per activation channel)."""


class CenteredLogitTarget:
    """The score a CAM explains for class ``category``: its logit minus the mean of all logits.

    A pytorch-grad-cam target (called on one ``(C,)`` row or a ``(B, C)`` batch of logits).
    """

    def __init__(self, category: int) -> None:
        self.category = category

    def __call__(self, logits: Tensor) -> Tensor:
        if logits.shape[-1] == 1:
            return logits[..., 0]
        return logits[..., self.category] - logits.mean(-1)

    def __repr__(self) -> str:
        return f"CenteredLogitTarget({self.category})"


class FindingLogitTarget:
    """The score a CAM explains for finding ``category`` of a multi-label model: its own logit
    (each finding has its own sigmoid, so other findings' logits do not enter its probability).
    """

    def __init__(self, category: int) -> None:
        self.category = category

    def __call__(self, logits: Tensor) -> Tensor:
        return logits[..., self.category]

    def __repr__(self) -> str:
        return f"FindingLogitTarget({self.category})"


@dataclass
class CamResult:
    """One image's heatmap and what it explains."""

    heatmap: np.ndarray
    """float32 in [0, 1], ``size`` x ``size``, in model-input (square, letterboxed) coordinates."""
    target: str
    """Name of the class explained (for ``eigencam``: the class it was computed for, unused)."""
    target_index: int
    method: str

    def to_original(self, letterbox: Letterbox | None) -> np.ndarray:
        """The heatmap on the original image's pixel grid.

        Args:
            letterbox: Where the original sits in the square input (``Preprocessed.letterbox``
                or ``resize_to_square``'s second value). None returns the heatmap unchanged (a
                cache hit carries no letterbox: re-read the file with ``reuse=False`` to map it).

        Returns:
            float32 in [0, 1] of shape ``letterbox.original_shape``: the bars cropped, the rest
            resized back (bilinear).

        Raises:
            ValueError: The heatmap's size is not the letterbox's.
        """
        if letterbox is None:
            return self.heatmap
        import cv2

        size = letterbox.size
        if self.heatmap.shape != (size, size):
            raise ValueError(
                f"heatmap is {self.heatmap.shape}, but the letterbox maps a {size}x{size} input; "
                "pass the letterbox of the image this heatmap was computed for"
            )
        crop = np.ascontiguousarray(letterbox.crop(self.heatmap), dtype=np.float32)
        h, w = letterbox.original_shape
        if crop.shape != (h, w):
            crop = cv2.resize(crop, (w, h), interpolation=cv2.INTER_LINEAR)
        return np.clip(crop, 0.0, 1.0).astype(np.float32, copy=False)


class CamExplainer:
    """Grad-CAM-family heatmaps of one model or of a fold ensemble's averaged logits.

    Use as a context manager (or call :meth:`close`); an open explainer holds no hooks between
    calls, so forgetting to close leaks nothing but the object.

    Example::

        with CamExplainer(predictor.models, method="gradcam") as cam:
            heatmaps = cam.explain(predictor.to_tensor(pixels))
    """

    def __init__(
        self,
        models: list[XrayClassifier],
        *,
        method: str = "gradcam",
        device: torch.device | None = None,
        multilabel: bool = False,
    ) -> None:
        """Set up the CAM for ``models``.

        Args:
            models: One model or the members of a fold ensemble: the same backbone and classes.
                They are switched to eval mode (as the library does) and left there.
            method: One of :data:`CAM_METHODS`.
            multilabel: The models predict findings (one sigmoid each): a target is explained
                by its own logit (:class:`FindingLogitTarget`), not centred on the others.
            device: Where to run; defaults to, and must match, the models' device (the
                explainer does not move models that others may be using).

        Raises:
            ValueError: Unknown method, no models, or members that do not form an ensemble.
        """
        cam_cls = _cam_class(method)
        if not models:
            raise ValueError("CamExplainer needs at least one model")
        first = models[0]
        for m in models[1:]:
            if (m.spec.name, m.num_classes, m.image_size) != (
                first.spec.name,
                first.num_classes,
                first.image_size,
            ):
                raise ValueError(
                    "ensemble members differ: "
                    f"{m.spec.name}/{m.num_classes} classes/{m.image_size}px vs "
                    f"{first.spec.name}/{first.num_classes} classes/{first.image_size}px"
                )
        model_device = next(first.parameters()).device
        if device is not None and not _same_device(torch.device(device), model_device):
            raise ValueError(
                f"the models are on {model_device}, not {device}; move them first "
                "(e.g. Predictor.from_run(..., device=...))"
            )
        self.method = method
        self.models = list(models)
        self.device = model_device
        self.num_classes = first.num_classes
        self._ensemble = _MeanLogits(self.models)
        layers = [m.cam_target_layer() for m in self.models]
        # Same spec for every member, so one reshape serves all layers.
        reshape = first.cam_reshape()
        self._cam: BaseCAM | None = cam_cls(
            self._ensemble, target_layers=layers, reshape_transform=reshape
        )
        # The library hooks the layers for the object's whole life; ours hook only per call.
        self._cam.activations_and_grads.release()
        self._cam.activations_and_grads = _Recorder(
            self.models, layers, reshape, with_grads=self._cam.uses_gradients
        )
        if method == "scorecam":
            self._cam.batch_size = SCORECAM_BATCH_SIZE
        self.multilabel = multilabel

    @classmethod
    def from_predictor(cls, predictor: Predictor, *, method: str = "gradcam") -> CamExplainer:
        """An explainer of a loaded bundle's members (the fold ensemble or the refit model)."""
        return cls(
            predictor.models,
            method=method,
            device=predictor.device,
            multilabel=getattr(predictor, "multilabel", False),
        )

    def explain(self, batch: Tensor, targets: list[int] | None = None) -> np.ndarray:
        """Heatmaps for a normalised batch.

        Args:
            batch: ``N x 3 x H x W`` as the models take it (``Predictor.to_tensor``); square, any
                size the backbone accepts.
            targets: Class index to explain per image; None explains the ensemble's argmax
                (the uncalibrated, unthresholded one: pass the decision to explain it).

        Returns:
            ``N x H x W`` float32 in [0, 1].

        Raises:
            ValueError: A bad batch shape or target.
            RuntimeError: The explainer is closed.
        """
        if self._cam is None:
            raise RuntimeError("this CamExplainer is closed")
        if batch.ndim != 4 or batch.shape[1] != 3 or batch.shape[2] != batch.shape[3]:
            raise ValueError(
                f"expected a normalised N x 3 x S x S batch (square), got {tuple(batch.shape)}"
            )
        wrapped = None
        if targets is not None:
            if len(targets) != len(batch):
                raise ValueError(f"{len(targets)} targets for a batch of {len(batch)}")
            bad = [t for t in targets if not 0 <= int(t) < self.num_classes]
            if bad:
                raise ValueError(f"targets {bad} out of range for {self.num_classes} classes")
            target_cls = FindingLogitTarget if self.multilabel else CenteredLogitTarget
            wrapped = [target_cls(int(t)) for t in targets]
        heatmaps = self._cam(batch, wrapped)
        return np.clip(heatmaps, 0.0, 1.0).astype(np.float32, copy=False)

    def close(self) -> None:
        """Release the hooks and references (idempotent)."""
        if self._cam is not None:
            self._cam.activations_and_grads.release()
            self._cam = None

    def __enter__(self) -> CamExplainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def explain_pixels(
    predictor: Predictor,
    pixels: list[np.ndarray],
    *,
    method: str = "gradcam",
    target: int | str | None = None,
    cam_size: int | None = None,
) -> list[CamResult]:
    """Heatmaps for preprocessed images, one image at a time (memory stays that of one).

    Args:
        predictor: A loaded bundle; its members are explained together.
        pixels: HxW float32 in [0, 1] at ``predictor.prep.image_size`` (``preprocess_file``).
        method: One of :data:`CAM_METHODS`.
        target: Class to explain, by index or name, for every image; None explains each image's
            predicted class (the predictor's decision, calibration and threshold included).
        cam_size: Run the CAM on the input shrunk to this side (area averaging), then upsample
            the heatmap back to ``image_size``: about (image_size / cam_size)² less time and
            memory, at a coarser map, from a model seeing its input at another scale than it
            was trained on. A multiple of 32 up to ``image_size``; ``cam_size / 32`` must hold
            a Swin window and be divisible by MaxViT's partition (for 1024² models, 8: Swin
            needs at least 256, MaxViT a multiple of 256); ViT takes only ``image_size`` (its
            position embeddings are fixed to the trained grid).

    Returns:
        One :class:`CamResult` per image, heatmaps at ``image_size``.

    Raises:
        ValueError: Unknown method or class, wrongly sized pixels, or an unsupported cam_size.
    """
    import cv2

    _cam_class(method)
    size = predictor.prep.image_size
    for i, p in enumerate(pixels):
        if p.shape != (size, size):
            raise ValueError(
                f"pixels[{i}] is {p.shape}; the bundle takes preprocessed {size}x{size} images "
                "(preprocess_file(path, predictor.prep).pixels)"
            )
    run_size = size if cam_size is None else cam_size
    _check_cam_size(predictor.models[0], run_size)
    if not pixels:
        return []
    if target is None and getattr(predictor, "multilabel", False):
        # Findings: the most probable one (several may be present; pick one with ``target``).
        indices = [int(np.argmax(p.probs)) for p in predictor.predict(pixels)]
    elif target is None:
        names = [p.predicted for p in predictor.predict(pixels)]
        indices = [predictor.classes.index(n) for n in names]
    else:
        indices = [_class_index(target, predictor.classes)] * len(pixels)

    results = []
    with CamExplainer.from_predictor(predictor, method=method) as cam:
        for p, t in zip(pixels, indices, strict=True):
            x = np.ascontiguousarray(p, np.float32)
            if run_size != size:
                x = cv2.resize(x, (run_size, run_size), interpolation=cv2.INTER_AREA)
            heatmap = cam.explain(predictor.to_tensor([x]), [t])[0]
            if heatmap.shape != (size, size):
                heatmap = cv2.resize(heatmap, (size, size), interpolation=cv2.INTER_LINEAR)
                heatmap = np.clip(heatmap, 0.0, 1.0)
            results.append(CamResult(heatmap, predictor.classes[t], t, method))
    return results


def overlay(
    image: np.ndarray, heatmap: np.ndarray, *, alpha: float = 0.4, colormap: str = "jet"
) -> np.ndarray:
    """Blend a colour-mapped heatmap over an image.

    Args:
        image: HxW gray (or HxWx3 RGB), float in [0, 1] or uint8: the windowed original.
        heatmap: HxW in [0, 1], on the image's grid (``CamResult.to_original``).
        alpha: Heatmap weight; 0 returns the image, 1 the colour-mapped heatmap.
        colormap: An OpenCV colormap name: ``jet``, ``turbo``, ``viridis``, ``inferno``, ...

    Returns:
        HxWx3 uint8 RGB.

    Raises:
        ValueError: Shapes that do not match, values outside [0, 1], a bad alpha or colormap.
    """
    import cv2

    img = np.asarray(image)
    img = img.astype(np.float32) / 255.0 if img.dtype == np.uint8 else img.astype(np.float32)
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
        raise ValueError(f"image must be HxW gray or HxWx3 RGB, got shape {img.shape}")
    hm = np.asarray(heatmap, dtype=np.float32)
    if hm.ndim != 2:
        raise ValueError(f"heatmap must be HxW, got shape {hm.shape}")
    if hm.shape != img.shape[:2]:
        raise ValueError(
            f"heatmap {hm.shape} does not match image {img.shape[:2]}; map it to the image's "
            "grid first (CamResult.to_original(letterbox))"
        )
    for name, arr in (("image", img), ("heatmap", hm)):
        if arr.size and not (np.isfinite(arr).all() and arr.min() >= 0.0 and arr.max() <= 1.0):
            raise ValueError(f"{name} values must be finite and in [0, 1]")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    code = _colormap(colormap)

    colored = cv2.applyColorMap(np.rint(hm * 255.0).astype(np.uint8), code)
    colored = cv2.cvtColor(colored, cv2.COLOR_BGR2RGB).astype(np.float32)
    base = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img
    out = (1.0 - alpha) * (base * 255.0) + alpha * colored
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------ internals


class _MeanLogits(nn.Module):
    """The ensemble as one model: the members' logits averaged (how ``Predictor`` combines them)."""

    def __init__(self, members: list[XrayClassifier]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: Tensor) -> Tensor:
        if len(self.members) == 1:
            return self.members[0](x)
        return torch.stack([m(x) for m in self.members]).mean(0)


class _Recorder:
    """Stands in for pytorch-grad-cam's ``ActivationsAndGradients`` (same attributes).

    Inside :meth:`recording`, and only for the calling thread, it hooks each member (to turn
    gradients off at its input) and each target layer (to keep its activation and, for gradient
    methods, to turn gradients on and hand the rest of the network a fresh leaf).
    """

    def __init__(
        self,
        members: list[XrayClassifier],
        layers: list[nn.Module],
        reshape: Callable[[Tensor], Tensor] | None,
        *,
        with_grads: bool,
    ) -> None:
        self.members = members
        self.layers = layers
        self.reshape_transform = reshape
        self.with_grads = with_grads
        self.activations: list[Tensor] = []
        self.gradients: list[Tensor] = []
        self.leaves: list[Tensor | None] = []
        self._thread: int | None = None
        self._handles: list[Any] = []

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Hook the modules for one forward (and backward) of the calling thread."""
        n = len(self.layers)
        self.activations, self.gradients, self.leaves = [None] * n, [], [None] * n  # type: ignore[list-item]
        self._thread = threading.get_ident()
        try:
            with torch.no_grad():
                for m in self.members:
                    self._handles.append(m.register_forward_pre_hook(self._member_start))
                for i, layer in enumerate(self.layers):
                    self._handles.append(layer.register_forward_hook(partial(self._layer_out, i)))
                yield
        finally:
            self._remove_hooks()
            self.leaves = []
            self._thread = None

    def _mine(self) -> bool:
        return self._thread == threading.get_ident()

    def _member_start(self, module: nn.Module, args: Any) -> None:
        if self._mine():
            # The previous member's target layer switched gradients on; this one starts without.
            torch.set_grad_enabled(False)

    def _layer_out(self, index: int, module: nn.Module, args: Any, output: Any) -> Tensor | None:
        if not self._mine():
            return None
        if not isinstance(output, Tensor):
            raise TypeError(
                f"CAM target layer {type(module).__name__} returns {type(output).__name__}, "
                "not a tensor"
            )
        activation = output.detach()
        if self.reshape_transform is not None:
            activation = self.reshape_transform(activation)
        # A copy: on CPU .cpu() would alias a buffer the rest of the forward may reuse.
        self.activations[index] = activation.to("cpu", copy=True)
        if not self.with_grads:
            return None
        torch.set_grad_enabled(True)
        leaf = output.detach().requires_grad_(True)
        self.leaves[index] = leaf
        return leaf

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def clear(self) -> None:
        """Drop recorded tensors."""
        self.activations, self.gradients, self.leaves = [], [], []

    def release(self) -> None:
        """What the library calls on exit and in ``__del__``."""
        self._remove_hooks()
        self.clear()


def _forward(
    self: BaseCAM, input_tensor: Tensor, targets: list[Any] | None, eigen_smooth: bool = False
) -> np.ndarray:
    """``BaseCAM.forward`` on the :class:`_Recorder`: backward to the target layers only."""
    rec: _Recorder = self.activations_and_grads
    x = input_tensor.to(self.device)
    try:
        with rec.recording():
            outputs = self.model(x)
            missing = [i for i, a in enumerate(rec.activations) if a is None]
            if missing:
                raise RuntimeError(f"CAM target layers {missing} did not run in the forward pass")
            if targets is None:
                targets = [CenteredLogitTarget(int(c)) for c in outputs.argmax(-1).tolist()]
            if self.uses_gradients:
                with torch.enable_grad():
                    score = sum(t(o) for t, o in zip(targets, outputs, strict=True))
                    # x k: each member's layer gets its own logit's gradient, not 1/k of it, so
                    # a member's map is the one it gets alone (Grad-CAM++ is not scale-free).
                    score = score * len(rec.members)
                grads = torch.autograd.grad(score, rec.leaves, allow_unused=True)
                del score
                reshape = rec.reshape_transform or (lambda g: g)
                rec.gradients = [
                    torch.zeros_like(a) if g is None else reshape(g).cpu()
                    for a, g in zip(rec.activations, grads, strict=True)
                ]
            del outputs
        cams = self.compute_cam_per_layer(x, targets, eigen_smooth)
        return self.aggregate_multi_layers(cams)
    finally:
        rec.clear()


def _scorecam_weights(
    self: BaseCAM,
    input_tensor: Tensor,
    target_layer: nn.Module,
    targets: list[Any],
    activations: np.ndarray,
    grads: Any,
) -> np.ndarray:
    """``ScoreCAM.get_cam_weights`` with the masked inputs built a batch at a time.

    Same computation: each channel, bilinearly upsampled (corners aligned) and min-max scaled,
    masks the input; the target's score on each masked input, softmaxed over channels, weights it.
    """
    import torch.nn.functional as F

    batch_size = getattr(self, "batch_size", SCORECAM_BATCH_SIZE)
    size = input_tensor.shape[-2:]
    acts = torch.from_numpy(activations)
    scores = torch.empty(acts.shape[:2])
    with torch.no_grad():
        for n, target in enumerate(targets):
            for c0 in range(0, acts.shape[1], batch_size):
                chunk = acts[n : n + 1, c0 : c0 + batch_size].to(self.device)
                up = F.interpolate(chunk, size=size, mode="bilinear", align_corners=True)[0]
                flat = up.flatten(1)
                lo, hi = flat.min(1).values, flat.max(1).values
                up = (up - lo[:, None, None]) / (hi - lo + 1e-8)[:, None, None]
                masked = input_tensor[n][None] * up[:, None]
                out = self.model(masked)
                scores[n, c0 : c0 + len(up)] = torch.stack([target(o) for o in out]).float().cpu()
    return torch.softmax(scores, dim=-1).numpy()


def _eigencam_image(
    self: BaseCAM,
    input_tensor: Tensor,
    target_layer: nn.Module,
    targets: list[Any],
    activations: np.ndarray,
    grads: Any,
    eigen_smooth: bool,
) -> np.ndarray:
    """EigenCAM's first principal component, signed so that its larger extreme is positive."""
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_with_sign_correction

    return get_2d_projection_with_sign_correction(activations)


def _cam_class(method: str) -> type[BaseCAM]:
    """The pytorch-grad-cam class for ``method``, running on :class:`_Recorder`."""
    if method not in CAM_METHODS:
        raise ValueError(f"unknown CAM method {method!r}; valid: {', '.join(CAM_METHODS)}")
    return _build_cam_class(method)


@cache
def _build_cam_class(method: str) -> type[BaseCAM]:
    from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, ScoreCAM

    base = {
        "gradcam": GradCAM,
        "gradcam++": GradCAMPlusPlus,
        "hirescam": HiResCAM,
        "eigencam": EigenCAM,
        "scorecam": ScoreCAM,
    }[method]
    attrs: dict[str, Any] = {"forward": _forward}
    if method == "scorecam":
        attrs["get_cam_weights"] = _scorecam_weights
    if method == "eigencam":
        attrs["get_cam_image"] = _eigencam_image
    return type(f"Xray{base.__name__}", (base,), attrs)


def _check_cam_size(model: XrayClassifier, cam_size: int) -> None:
    """Raise ValueError unless ``model`` (built for ``model.image_size``) runs at ``cam_size``."""
    try:
        validate_image_size(cam_size)
    except ValueError as e:
        raise ValueError(f"cam_size: {e}") from None
    if cam_size > model.image_size:
        raise ValueError(
            f"cam_size {cam_size} exceeds the model's input size {model.image_size}; "
            "it only shrinks the input"
        )
    if cam_size == model.image_size:
        return
    family = model.spec.family
    if family == "vit":
        raise ValueError(
            f"{model.spec.name} takes only {model.image_size}x{model.image_size} inputs (its "
            "position embeddings are fixed to that grid): leave cam_size unset"
        )
    window = getattr(model, "window_size", None)
    last = cam_size // 32  # side of the last stage's map
    if family == "swin" and window and last < window:
        raise ValueError(
            f"{model.spec.name} attends in {window}x{window} windows, which its last "
            f"{last}x{last} stage map cannot hold; cam_size must be at least {32 * window}"
        )
    if family == "maxvit" and window and last % window:
        valid = list(range(32 * window, model.image_size + 1, 32 * window))
        raise ValueError(
            f"{model.spec.name} partitions its last {last}x{last} stage map "
            f"into {window}x{window} windows, which must divide it; cam_size must be one of {valid}"
        )


def _same_device(wanted: torch.device, actual: torch.device) -> bool:
    # Predictor.device may be "cuda" while parameters sit on "cuda:0".
    if wanted.type != actual.type:
        return False
    return wanted.index is None or actual.index is None or wanted.index == actual.index


def _class_index(target: int | str, classes: list[str]) -> int:
    if isinstance(target, str):
        if target not in classes:
            raise ValueError(f"unknown class {target!r}; the bundle's classes: {classes}")
        return classes.index(target)
    if isinstance(target, bool) or not isinstance(target, int | np.integer):
        raise ValueError(f"target must be a class index or name, got {target!r}")
    if not 0 <= int(target) < len(classes):
        raise ValueError(f"target index {target} out of range for classes {classes}")
    return int(target)


def _colormap(name: str) -> int:
    import cv2

    code = getattr(cv2, f"COLORMAP_{name.upper()}", None) if isinstance(name, str) else None
    if code is None:
        valid = sorted(k[9:].lower() for k in dir(cv2) if k.startswith("COLORMAP_"))
        raise ValueError(f"unknown colormap {name!r}; OpenCV has: {', '.join(valid)}")
    return int(code)
