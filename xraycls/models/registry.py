"""Backbone registry and the one model factory, ``create_model``.

Each backbone registers a builder under a name with ``@register_backbone`` (the shape of
fvcore's ``Registry`` and timm's ``register_model``); ``create_model`` looks the name up,
validates the arguments, builds, loads pretrained weights and switches gradient checkpointing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, get_args

if TYPE_CHECKING:
    from xraycls.models.base import XrayClassifier

Family = Literal["swin", "maxvit", "vit", "resnet"]
FeatureFormat = Literal["NCHW", "NHWC", "tokens"]

# Every family downsamples by 32 overall (ViT's patch 16 divides it too); sizes that are not a
# multiple would be padded or cropped somewhere inside the backbone.
SIZE_MULTIPLE = 32


class Builder(Protocol):
    """Builds a randomly initialised model for a spec."""

    def __call__(
        self, spec: BackboneSpec, *, num_classes: int, image_size: int, drop_path_rate: float
    ) -> XrayClassifier: ...


@dataclass(frozen=True)
class BackboneSpec:
    """What the rest of the package needs to know about a registered backbone.

    Attributes:
        name: Registry name, e.g. ``"swin_tiny"``.
        family: Architecture family: ``swin``, ``maxvit``, ``vit`` or ``resnet``.
        feature_format: Layout of the Grad-CAM target layer's activation.
        builder: Function building the randomly initialised model.
        pretrained_hint: A Hub id whose weights fit this backbone (used only when passed as
            ``pretrained``), or None for the tiny test variants.
        feature_stride: Input pixels per Grad-CAM map cell (32, or 16 for ViT/16).
        num_prefix_tokens: Non-spatial tokens before the grid in token activations (ViT CLS).
        is_test: A tiny variant for CPU tests: same code path, toy dimensions.
        description: One line from the builder's docstring.
    """

    name: str
    family: Family
    feature_format: FeatureFormat
    builder: Builder
    pretrained_hint: str | None = None
    feature_stride: int = 32
    num_prefix_tokens: int = 0
    is_test: bool = False
    description: str = ""


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(
    name: str,
    *,
    family: Family,
    feature_format: FeatureFormat,
    pretrained_hint: str | None = None,
    feature_stride: int = 32,
    num_prefix_tokens: int = 0,
) -> Callable[[Builder], Builder]:
    """Decorator registering a builder under ``name``.

    Names ending in ``_test`` are marked as tiny test variants.

    Raises:
        ValueError: If the name is taken or the family / feature format is unknown.
    """
    if family not in get_args(Family):
        raise ValueError(f"unknown family {family!r}; expected one of {get_args(Family)}")
    if feature_format not in get_args(FeatureFormat):
        raise ValueError(
            f"unknown feature_format {feature_format!r}; expected one of {get_args(FeatureFormat)}"
        )

    def decorator(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered")
        doc = (builder.__doc__ or "").strip()
        _REGISTRY[name] = BackboneSpec(
            name=name,
            family=family,
            feature_format=feature_format,
            builder=builder,
            pretrained_hint=pretrained_hint,
            feature_stride=feature_stride,
            num_prefix_tokens=num_prefix_tokens,
            is_test=name.endswith("_test"),
            description=doc.splitlines()[0] if doc else "",
        )
        return builder

    return decorator


def list_backbones() -> list[str]:
    """Registered backbone names, sorted."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> BackboneSpec:
    """The spec registered under ``name``.

    Raises:
        ValueError: If no backbone has that name; the message lists the valid ones.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown backbone {name!r}; valid names: {', '.join(list_backbones())}"
        ) from None


def validate_image_size(image_size: int) -> None:
    """Check that ``image_size`` is a positive multiple of 32.

    Raises:
        ValueError: Otherwise, suggesting the nearest valid sizes.
    """
    if (
        isinstance(image_size, bool)
        or not isinstance(image_size, int)
        or image_size < SIZE_MULTIPLE
    ):
        raise ValueError(f"image_size must be an int >= {SIZE_MULTIPLE}, got {image_size!r}")
    if image_size % SIZE_MULTIPLE:
        below = image_size - image_size % SIZE_MULTIPLE
        raise ValueError(
            f"image_size must be a multiple of {SIZE_MULTIPLE} (every backbone downsamples by 32), "
            f"got {image_size}; use {below} or {below + SIZE_MULTIPLE}"
        )


def create_model(
    name: str,
    *,
    num_classes: int,
    image_size: int = 1024,
    pretrained: str | Path | None = None,
    grad_checkpointing: bool = False,
    drop_path_rate: float = 0.0,
) -> XrayClassifier:
    """Build a classifier: the only constructor of models in this package.

    Args:
        name: A name from ``list_backbones()``.
        num_classes: Number of output logits.
        image_size: Side of the square input; any multiple of 32. Window sizes, position
            embeddings and relative position tables are set up for it.
        pretrained: Backbone weights: a directory written by ``save_pretrained`` (Swin/ViT), a
            ``.safetensors`` state dict (any family), or a Hugging Face Hub id such as
            ``"microsoft/swin-tiny-patch4-window7-224"``. The head is always freshly initialised.
        grad_checkpointing: Recompute activations in the backward pass to save memory.
        drop_path_rate: Stochastic depth rate (Swin, MaxViT, ResNet; ViT has none).

    Returns:
        The model, in training mode.

    Raises:
        ValueError: Unknown name, bad image size or class count.
        PretrainedWeightsError: The weights cannot be found, read or fitted.
    """
    spec = get_spec(name)
    validate_image_size(image_size)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
    model = spec.builder(
        spec,
        num_classes=num_classes,
        image_size=image_size,
        drop_path_rate=drop_path_rate,
    )
    if pretrained is not None:
        model.load_pretrained(pretrained)
    model.set_grad_checkpointing(grad_checkpointing)
    return model
