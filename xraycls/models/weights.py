"""What crosses between a backbone and the rest: its weights on disk and the input it expects.

Weights are safetensors files (no code runs when they are read, unlike ``torch.load``), written
atomically. Inputs are the preprocessed grey image repeated on three channels and normalised with
the statistics of the backbone's pretrained checkpoints: one function does this for training,
scoring and the viewer alike.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from xraycls.io.files import atomic_path
from xraycls.models.registry import get_spec

Normalization = tuple[tuple[float, ...], tuple[float, ...]]

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
INCEPTION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
_FAMILY_NORMALIZATION = {
    "swin": IMAGENET,
    "resnet": IMAGENET,
    "maxvit": INCEPTION,
    "vit": INCEPTION,
}
"""Microsoft's Swin and timm's ResNet50 checkpoints use ImageNet statistics; timm's MaxViT-TF
and Google's ViT-in21k checkpoints use 0.5/0.5. Feeding the wrong ones shifts every input."""


def normalization_for(model_name: str) -> Normalization:
    """(mean, std) per channel for a backbone's pretrained checkpoints."""
    return _FAMILY_NORMALIZATION[get_spec(model_name).family]


def to_model_input(pixels: np.ndarray | torch.Tensor, normalization: Normalization) -> torch.Tensor:
    """Preprocessed grey images -> the normalised 3-channel float32 tensor a backbone takes.

    Args:
        pixels: ``H x W`` or ``N x H x W`` values in [0, 1] (the output of
            :func:`xraycls.io.preprocess.preprocess_file`).
        normalization: ``(mean, std)`` per channel (:func:`normalization_for`).

    Returns:
        ``3 x H x W`` or ``N x 3 x H x W``, contiguous.
    """
    x = torch.as_tensor(pixels, dtype=torch.float32)
    batched = x.ndim == 3
    x = x.unsqueeze(-3)  # channel axis
    shape = (1, 3, 1, 1) if batched else (3, 1, 1)
    mean = torch.tensor(normalization[0], dtype=torch.float32).view(shape)
    std = torch.tensor(normalization[1], dtype=torch.float32).view(shape)
    return ((x.expand(*x.shape[:-3], 3, *x.shape[-2:]) - mean) / std).contiguous()


def save_weights(
    path: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write a state dict to ``path`` atomically (tensors made contiguous, shared storage split)."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors state dict (no code execution, unlike ``torch.load``)."""
    return load_file(str(path))
