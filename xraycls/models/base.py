"""The common classifier wrapper every backbone family returns."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from torch import Tensor, nn

if TYPE_CHECKING:
    from xraycls.models.pretrained import LoadReport
    from xraycls.models.registry import BackboneSpec


class XrayClassifier(nn.Module):
    """A backbone plus a freshly initialised linear head, with the hooks training and Grad-CAM need.

    ``forward`` returns plain logits (not a Hugging Face ``ModelOutput``) so pytorch-grad-cam,
    losses and metrics can use the model as is. The state dict is always laid out as
    ``backbone.*`` + ``head.*``, whatever the family.

    Subclasses implement ``forward_features``, ``stages``, ``cam_target_layer`` and
    ``set_grad_checkpointing``; pretrained loading is tuned through the class attributes and
    ``_adapt_checkpoint`` / ``_read_hf_checkpoint``.

    Attributes:
        spec: The registry entry the model was built from.
        image_size: Side of the square input the model was built for.
        num_classes: Number of logits.
        backbone: The family's feature extractor (a ``transformers`` or ``timm`` module).
        head: The classifier, ``nn.Linear(num_features, num_classes)``.
        grad_checkpointing: Whether activation checkpointing is on.
    """

    channels_last_preferred: ClassVar[bool] = False
    # Pretrained loading: whether `config.json` directories are read through transformers, which
    # prefixes a Hugging Face checkpoint may put before the backbone keys, and which checkpoint
    # keys belong to the source model's own classifier (always dropped: our head is fresh).
    hf_format: ClassVar[bool] = False
    checkpoint_prefixes: ClassVar[tuple[str, ...]] = ()
    ignored_checkpoint_prefixes: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        spec: BackboneSpec,
        backbone: nn.Module,
        *,
        num_features: int,
        num_classes: int,
        image_size: int,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.image_size = image_size
        self.num_classes = num_classes
        self.num_features = num_features
        self.backbone = backbone
        self.head = nn.Linear(num_features, num_classes)
        self.grad_checkpointing = False

    def forward(self, x: Tensor) -> Tensor:
        """Classify a batch.

        Args:
            x: Images, ``(B, 3, H, W)``, normalised.

        Returns:
            Logits, ``(B, num_classes)``.
        """
        return self.head(self.forward_features(x))

    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled image features, ``(B, num_features)``: what the head sees."""
        raise NotImplementedError

    def stages(self) -> list[nn.Module]:
        """Backbone modules from input to output, head excluded.

        The stem / patch embedding comes first, then each stage (each block for ViT); the final
        norm travels with the last stage. Together they hold every non-head parameter exactly
        once, which is what staged freezing ("train: last_stages(2)") and layer-wise learning
        rate decay rely on.
        """
        raise NotImplementedError

    def cam_target_layer(self) -> nn.Module:
        """The module whose activations and gradients Grad-CAM uses."""
        raise NotImplementedError

    def cam_reshape(self) -> Callable[[Tensor], Tensor] | None:
        """A function turning the target layer's activation into ``(B, C, h, w)``, or None if it is NCHW.

        The grid is read from the activation itself, so it follows whatever (square) image size
        is fed: Swin at 1024² gives 32x32, ViT-B/16 at 1024² gives 64x64 after dropping the CLS
        token.
        """
        fmt = self.spec.feature_format
        if fmt == "NCHW":
            return None
        if fmt == "NHWC":
            return nhwc_to_nchw
        return partial(tokens_to_nchw, num_prefix_tokens=self.spec.num_prefix_tokens)

    def set_grad_checkpointing(self, enabled: bool) -> None:
        """Recompute block activations in the backward pass (less memory, about 1.5x the time)."""
        raise NotImplementedError

    def load_pretrained(self, source: str | Path, *, strict: bool = True) -> LoadReport:
        """Load backbone weights; see ``xraycls.models.pretrained.load_pretrained``."""
        from xraycls.models.pretrained import load_pretrained

        return load_pretrained(self, source, strict=strict)

    def _adapt_checkpoint(self, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
        """Resize geometry-dependent tensors (position tables) to this model; returns the resized keys."""
        return state, []

    def _read_hf_checkpoint(self, directory: Path) -> tuple[dict[str, Tensor], list[str]]:
        """Read a ``save_pretrained`` directory; returns the backbone state and the keys left out."""
        raise NotImplementedError(f"{type(self).__name__} does not read Hugging Face directories")

    def extra_repr(self) -> str:
        return (
            f"name={self.spec.name}, image_size={self.image_size}, num_classes={self.num_classes}"
        )


def tokens_to_nchw(tokens: Tensor, *, num_prefix_tokens: int = 0) -> Tensor:
    """``(B, prefix + h*w, C)`` -> ``(B, C, h, w)`` for a square token grid.

    Args:
        tokens: Token activations.
        num_prefix_tokens: Leading non-spatial tokens to drop (1 for a ViT CLS token).

    Raises:
        ValueError: If the spatial tokens do not form a square grid.
    """
    spatial = tokens[:, num_prefix_tokens:, :]
    batch, count, channels = spatial.shape
    side = math.isqrt(count)
    if side * side != count:
        raise ValueError(
            f"cannot reshape {count} tokens to a square grid; Grad-CAM expects square inputs"
        )
    return spatial.reshape(batch, side, side, channels).permute(0, 3, 1, 2)


def nhwc_to_nchw(x: Tensor) -> Tensor:
    """``(B, H, W, C)`` -> ``(B, C, H, W)``."""
    return x.permute(0, 3, 1, 2)
