"""Backbones behind one factory: ``create_model(name, num_classes=..., image_size=...)``.

Importing this package imports torch (unlike ``import xraycls``); transformers and timm are
imported when a model of their family is built.
"""

from __future__ import annotations

from xraycls.models import backbones as _backbones  # noqa: F401  (registers the backbones)
from xraycls.models.backbones import window_size_for
from xraycls.models.base import XrayClassifier
from xraycls.models.pretrained import LoadReport, PretrainedWeightsError, load_pretrained
from xraycls.models.registry import (
    BackboneSpec,
    create_model,
    get_spec,
    list_backbones,
    register_backbone,
)

__all__ = [
    "BackboneSpec",
    "LoadReport",
    "PretrainedWeightsError",
    "XrayClassifier",
    "create_model",
    "get_spec",
    "list_backbones",
    "load_pretrained",
    "register_backbone",
    "window_size_for",
]
