"""The backbone families: Swin and ViT (transformers), MaxViT and ResNet50 (timm).

Each family is one ``XrayClassifier`` subclass; the registered names below only choose its
dimensions. The ``*_test`` variants run the same classes with toy dimensions so CPU tests
exercise the real code paths.

Why one module of ~640 lines: the four families share the checkpoint-adaptation, window-size and
registration helpers at the top, and a reader comparing how each family is built (stages, CAM
layer, checkpointing) wants them side by side; split per family, every file would import the
others' helpers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from xraycls.models.base import XrayClassifier
from xraycls.models.pretrained import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    PretrainedWeightsError,
    resize_position_embedding,
    resize_relative_position_table,
)
from xraycls.models.registry import BackboneSpec, register_backbone

if TYPE_CHECKING:
    from timm.models.maxxvit import MaxxVitCfg

# Swin and MaxViT attend within square windows. Their stage maps are image_size / 4, 8, 16 and 32,
# so a window that divides image_size / 32 divides every stage map: no padding, no wasted work.
PREFERRED_WINDOW = 7  # what the ImageNet checkpoints were trained with


def window_size_for(image_size: int) -> int:
    """Attention window (Swin) / partition size (MaxViT) for a square input.

    The rule: the smallest divisor of ``image_size // 32`` (the last stage map) that is at least
    7, the window of the 224² ImageNet checkpoints; if the last map is smaller than 7, the whole
    map. So 224 -> 7, 256 -> 8, 384 -> 12, 512 -> 8, 1024 -> 8, 64 -> 2.

    Why: a window dividing the last map divides every stage map (they are 2x, 4x, 8x larger), so
    no stage is padded. Window 7 at 1024² pads 256/128/64/32 to 259/133/70/35 and crops back; 8
    does not and is ~18% faster on Swin-B. Keeping the window at least 7 keeps the attention
    span the checkpoints learned. Sizes whose last map has no divisor in 7..16 (e.g. 736 -> 23)
    get large windows; prefer multiples of 256.

    Args:
        image_size: A multiple of 32.
    """
    last = image_size // 32
    return next((d for d in range(PREFERRED_WINDOW, last + 1) if last % d == 0), last)


# ------------------------------------------------------------------------------ transformers


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars and load tables: ``load_pretrained`` reports instead."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _hf_checkpoint(
    directory: Path,
    model_cls: Any,
    config: Any,
    arch_keys: tuple[str, ...],
    name: str,
    **model_kwargs: Any,
) -> tuple[dict[str, Tensor], list[str]]:
    """Read a ``save_pretrained`` directory with its own config, so transformers converts
    legacy key names (``attention.self.query`` -> ``q_proj`` ...) and strips task prefixes.

    Args:
        directory: Holds ``config.json`` and ``model.safetensors``.
        model_cls: ``SwinModel`` or ``ViTModel``.
        config: The config of the model being loaded, for the architecture check.
        arch_keys: Config fields that must agree (image size and window may differ).
        name: Registry name, for messages.
        **model_kwargs: Passed to ``from_pretrained`` (e.g. ``add_pooling_layer``).

    Returns:
        The backbone state and the checkpoint keys transformers left out (its classifier...).
    """
    raw = json.loads((directory / CONFIG_NAME).read_text())
    if raw.get("model_type") != config.model_type:
        raise PretrainedWeightsError(
            f"{directory} holds a {raw.get('model_type')!r} checkpoint; {name} needs "
            f"{config.model_type!r}"
        )
    if not (directory / WEIGHTS_NAME).is_file():
        raise PretrainedWeightsError(
            f"{directory}: no {WEIGHTS_NAME}; only safetensors weights are loaded (pickled .bin "
            "files can run code). Re-save it with save_pretrained, which writes safetensors."
        )
    source_config = type(config).from_pretrained(directory)
    differ = [
        f"{k}={_plain(getattr(source_config, k))} (model: {_plain(getattr(config, k))})"
        for k in arch_keys
        if _plain(getattr(source_config, k)) != _plain(getattr(config, k))
    ]
    if differ:
        raise PretrainedWeightsError(
            f"{directory} is another architecture than {name}: {', '.join(differ)}"
        )
    with _quiet_transformers():
        source, info = model_cls.from_pretrained(
            directory,
            config=source_config,
            use_safetensors=True,
            local_files_only=True,
            output_loading_info=True,
            dtype=torch.float32,
            **model_kwargs,
        )
    if info["missing_keys"] or info["mismatched_keys"]:
        raise PretrainedWeightsError(
            f"{directory}: checkpoint lacks or mis-sizes backbone weights: missing "
            f"{sorted(info['missing_keys'])}, mismatched {sorted(map(str, info['mismatched_keys']))}"
        )
    return source.state_dict(), sorted(info["unexpected_keys"])


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple | list) else value


class SwinClassifier(XrayClassifier):
    """Swin Transformer (transformers ``SwinModel``): mean-pooled final tokens -> linear head."""

    hf_format = True
    checkpoint_prefixes = ("swin.",)
    ignored_checkpoint_prefixes = ("classifier.",)
    _ARCH_KEYS: ClassVar[tuple[str, ...]] = (
        "patch_size", "embed_dim", "depths", "num_heads", "mlp_ratio", "use_absolute_embeddings",
    )  # fmt: skip

    @classmethod
    def build(
        cls,
        spec: BackboneSpec,
        *,
        embed_dim: int,
        depths: tuple[int, ...],
        num_heads: tuple[int, ...],
        num_classes: int,
        image_size: int,
        drop_path_rate: float,
    ) -> SwinClassifier:
        """Build a randomly initialised Swin with the window chosen by ``window_size_for``."""
        from transformers import SwinConfig, SwinModel

        config = SwinConfig(
            image_size=image_size,
            patch_size=4,
            embed_dim=embed_dim,
            depths=list(depths),
            num_heads=list(num_heads),
            window_size=window_size_for(image_size),
            drop_path_rate=drop_path_rate,
        )
        backbone = SwinModel(config, add_pooling_layer=True)
        return cls(
            spec,
            backbone,
            num_features=backbone.num_features,
            num_classes=num_classes,
            image_size=image_size,
        )

    @property
    def window_size(self) -> int:
        """The attention window (tokens per side)."""
        return self.backbone.config.window_size

    def forward_features(self, x: Tensor) -> Tensor:
        return self.backbone(pixel_values=x).pooler_output

    def stages(self) -> list[nn.Module]:
        b = self.backbone
        *early, last = b.encoder.layers
        return [b.embeddings, *early, nn.ModuleList([last, b.layernorm])]

    def cam_target_layer(self) -> nn.Module:
        # The last block's input norm, not the final norm: at the final norm Grad-CAM is exactly
        # each token's share of the mean-pooled logit, and trained models put that evidence on
        # background tokens (a toy model trained on a bright square: 0/8 maps on the square at
        # 512 px, vs 8/8 here, where the last stage's window attention still mixes tokens).
        return self.backbone.encoder.layers[-1].blocks[-1].layernorm_before

    def set_grad_checkpointing(self, enabled: bool) -> None:
        if enabled:
            self.backbone.activation_checkpointing_enable()
            # transformers flags both each SwinStage and its blocks; the nested checkpoints run
            # every block forward three times. Per block only: Swin-T 1024² 6.9 s / 2.9 GB
            # instead of 10.2 s / 3.2 GB per step on 2 cores.
            for stage in self.backbone.encoder.layers:
                stage.gradient_checkpointing = False
        else:
            self.backbone.activation_checkpointing_disable()
        self.grad_checkpointing = enabled

    def _read_hf_checkpoint(self, directory: Path) -> tuple[dict[str, Tensor], list[str]]:
        from transformers import SwinModel

        return _hf_checkpoint(
            directory, SwinModel, self.backbone.config, self._ARCH_KEYS, self.spec.name
        )

    def _adapt_checkpoint(self, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
        # The index buffers are derived from the window and rebuilt by the new config.
        state = {k: v for k, v in state.items() if not k.endswith("relative_position_index")}
        rows = (2 * self.window_size - 1) ** 2
        resized = [
            k
            for k, v in state.items()
            if k.endswith("relative_position_bias_table") and len(v) != rows
        ]
        for k in resized:
            state[k] = resize_relative_position_table(state[k], self.window_size)
        return state, resized


class VitClassifier(XrayClassifier):
    """ViT (transformers ``ViTModel``, no pooler): final layer-normed CLS token -> linear head.

    The position embeddings are built for the model's own grid; a checkpoint trained on another
    grid is interpolated once at load time, not at every forward.
    """

    hf_format = True
    checkpoint_prefixes = ("vit.",)
    ignored_checkpoint_prefixes = ("classifier.", "pooler.")
    _ARCH_KEYS: ClassVar[tuple[str, ...]] = (
        "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "intermediate_size", "qkv_bias",
    )  # fmt: skip

    @classmethod
    def build(
        cls,
        spec: BackboneSpec,
        *,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        intermediate_size: int,
        num_classes: int,
        image_size: int,
        drop_path_rate: float,
    ) -> VitClassifier:
        """Build a randomly initialised ViT with patch 16 for ``image_size``."""
        from transformers import ViTConfig, ViTModel

        if drop_path_rate:
            raise ValueError(
                f"{spec.name}: transformers' ViT has no stochastic depth (drop_path_rate)"
            )
        config = ViTConfig(
            image_size=image_size,
            patch_size=16,
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            intermediate_size=intermediate_size,
        )
        backbone = ViTModel(config, add_pooling_layer=False)
        return cls(
            spec, backbone, num_features=hidden_size, num_classes=num_classes, image_size=image_size
        )

    def forward_features(self, x: Tensor) -> Tensor:
        return self.backbone(pixel_values=x).last_hidden_state[:, 0]

    def stages(self) -> list[nn.Module]:
        b = self.backbone
        *early, last = b.layers
        return [b.embeddings, *early, nn.ModuleList([last, b.layernorm])]

    def cam_target_layer(self) -> nn.Module:
        # Not the final norm: the head reads only the CLS token there, so patch tokens get no
        # gradient. Before the last block's attention, patch tokens still feed the CLS token.
        return self.backbone.layers[-1].layernorm_before

    def set_grad_checkpointing(self, enabled: bool) -> None:
        if enabled:
            self.backbone.activation_checkpointing_enable()
        else:
            self.backbone.activation_checkpointing_disable()
        self.grad_checkpointing = enabled

    def _read_hf_checkpoint(self, directory: Path) -> tuple[dict[str, Tensor], list[str]]:
        from transformers import ViTModel

        return _hf_checkpoint(
            directory,
            ViTModel,
            self.backbone.config,
            self._ARCH_KEYS,
            self.spec.name,
            add_pooling_layer=False,
        )

    def _adapt_checkpoint(self, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
        key = "embeddings.position_embeddings"
        grid = self.image_size // self.backbone.config.patch_size
        if key not in state or state[key].shape[1] == grid * grid + 1:
            return state, []
        state = dict(state)
        state[key] = resize_position_embedding(state[key], grid, num_prefix_tokens=1)
        return state, [key]


# ------------------------------------------------------------------------------ timm


class TimmClassifier(XrayClassifier):
    """A timm model built with ``num_classes=0`` (it returns pooled features) -> linear head."""

    def forward_features(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def set_grad_checkpointing(self, enabled: bool) -> None:
        self.backbone.set_grad_checkpointing(enabled)
        self.grad_checkpointing = enabled


class MaxVitClassifier(TimmClassifier):
    """MaxViT (timm ``MaxxVit``, TF-ported variants) with window = grid = ``window_size_for``.

    timm's default partition is image_size / 32, i.e. a 32x32 partition (global attention over
    1024 tokens) at 1024²: 47.5 s and 12 GB per fwd+bwd on 2 cores, against 16-21 s / 8-9 GB
    with 8.

    Three changes to how timm's modules run, none to what they compute or to their parameters
    (timm ``maxvit_*_tf_*`` checkpoints load as before; ``benchmarks/profile_maxvit.py``
    measures them):

    - Channels-last: ``forward_features`` feeds the stem an NHWC-strided tensor, so every
      convolution and BatchNorm runs channels-last and each block's NCHW -> NHWC permute before
      its attention is a free view instead of a strided tensor that LayerNorm, the window
      partition and the residual adds copy.
    - Attention by plain matmuls: the relative position bias is a learnt mask, and PyTorch's
      CPU flash kernel takes no mask that needs a gradient, so ``scaled_dot_product_attention``
      falls back to its math path with extra masked-softmax passes.
    - Checkpointing per part: timm checkpoints a whole MaxViT block (MBConv + block attention +
      grid attention), so the backward of the first block rebuilds all three at 256²-512²
      together; here each part is its own checkpoint.
    """

    channels_last_preferred = True
    ignored_checkpoint_prefixes = ("head.fc.",)

    @classmethod
    def build(
        cls,
        spec: BackboneSpec,
        *,
        variant: str | None = None,
        cfg: MaxxVitCfg | None = None,
        num_classes: int,
        image_size: int,
        drop_path_rate: float,
    ) -> MaxVitClassifier:
        """Build timm ``variant`` (or a ``MaxxVitCfg`` for the test model), randomly initialised."""
        import timm
        from timm.models.maxxvit import MaxxVit

        window = window_size_for(image_size)
        kwargs = dict(
            img_size=image_size,
            num_classes=0,
            drop_path_rate=drop_path_rate,
            transformer_window_size=window,
            transformer_grid_size=window,
        )
        if variant is not None:
            backbone = timm.create_model(variant, pretrained=False, **kwargs)
        else:
            backbone = MaxxVit(cfg, **kwargs)
        _tune_maxxvit(backbone)
        return cls(
            spec,
            backbone,
            num_features=backbone.head_hidden_size,
            num_classes=num_classes,
            image_size=image_size,
        )

    def forward_features(self, x: Tensor) -> Tensor:
        # A no-op for a channels-last batch (what training passes, see channels_last_preferred).
        return self.backbone(x.contiguous(memory_format=torch.channels_last))

    def set_grad_checkpointing(self, enabled: bool) -> None:
        for stage in self.backbone.stages:
            stage.grad_checkpointing = False  # timm's: one checkpoint per whole block
            for block in stage.blocks:
                block.grad_checkpointing = enabled
        self.grad_checkpointing = enabled

    @property
    def window_size(self) -> int:
        """The block-attention window and grid-attention partition size."""
        return window_size_for(self.image_size)

    def stages(self) -> list[nn.Module]:
        b = self.backbone
        *early, last = b.stages
        # timm's head (fc removed) keeps the final norm and pre-logits layer: the last stage's.
        return [b.stem, *early, nn.ModuleList([last, b.norm, b.head])]

    def cam_target_layer(self) -> nn.Module:
        return self.backbone.stages[-1]

    def _adapt_checkpoint(self, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
        expected = self.backbone.state_dict()
        state = dict(state)
        resized = [
            k
            for k, v in state.items()
            if k.endswith("relative_position_bias_table")
            and k in expected
            and v.shape != expected[k].shape
        ]
        for k in resized:
            state[k] = resize_relative_position_table(state[k], self.window_size)
        return state, resized


def _tune_maxxvit(backbone: nn.Module) -> None:
    """Switch a timm ``MaxxVit`` to the execution ``MaxVitClassifier`` describes, in place.

    Only classes and flags change: module names, parameters and buffers stay timm's.
    """
    from timm.models.maxxvit import AttentionCl, MaxxVitBlock

    block_cls = _part_checkpointed_block_cls()
    for module in backbone.modules():
        if type(module) is MaxxVitBlock:
            module.__class__ = block_cls
            module.grad_checkpointing = False
        elif isinstance(module, AttentionCl):
            module.fused_attn = False


@functools.cache
def _part_checkpointed_block_cls() -> type[nn.Module]:
    """timm's ``MaxxVitBlock``, checkpointing its MBConv and its two attentions separately."""
    from timm.models.maxxvit import MaxxVitBlock
    from torch.utils.checkpoint import checkpoint

    class PartCheckpointedMaxxVitBlock(MaxxVitBlock):
        grad_checkpointing: bool

        def forward(self, x: Tensor) -> Tensor:
            if not (self.grad_checkpointing and torch.is_grad_enabled()):
                return super().forward(x)
            x = checkpoint(self.conv, x, use_reentrant=False)
            if not self.nchw_attn:
                x = x.permute(0, 2, 3, 1)
            if self.attn_block is not None:
                x = checkpoint(self.attn_block, x, use_reentrant=False)
            x = checkpoint(self.attn_grid, x, use_reentrant=False)
            if not self.nchw_attn:
                x = x.permute(0, 3, 1, 2)
            return x

    return PartCheckpointedMaxxVitBlock


class ResNetClassifier(TimmClassifier):
    """ResNet (timm), the CNN baseline."""

    channels_last_preferred = True
    ignored_checkpoint_prefixes = ("fc.",)

    @classmethod
    def build(
        cls,
        spec: BackboneSpec,
        *,
        variant: str | None = None,
        resnet_kwargs: dict[str, Any] | None = None,
        num_classes: int,
        image_size: int,
        drop_path_rate: float,
    ) -> ResNetClassifier:
        """Build timm ``variant`` (or ``ResNet(**resnet_kwargs)`` for the test model)."""
        import timm
        from timm.models.resnet import ResNet

        if variant is not None:
            backbone = timm.create_model(
                variant, pretrained=False, num_classes=0, drop_path_rate=drop_path_rate
            )
        else:
            backbone = ResNet(**(resnet_kwargs or {}), num_classes=0, drop_path_rate=drop_path_rate)
        return cls(
            spec,
            backbone,
            num_features=backbone.num_features,
            num_classes=num_classes,
            image_size=image_size,
        )

    def stages(self) -> list[nn.Module]:
        b = self.backbone
        return [nn.ModuleList([b.conv1, b.bn1]), b.layer1, b.layer2, b.layer3, b.layer4]

    def cam_target_layer(self) -> nn.Module:
        return self.backbone.layer4[-1]


# ------------------------------------------------------------------------------ registry

_swin = partial(register_backbone, family="swin", feature_format="tokens")
_maxvit = partial(register_backbone, family="maxvit", feature_format="NCHW")
_vit = partial(register_backbone, family="vit", feature_format="tokens", feature_stride=16,
               num_prefix_tokens=1)  # fmt: skip
_resnet = partial(register_backbone, family="resnet", feature_format="NCHW")


@_swin("swin_tiny", pretrained_hint="microsoft/swin-tiny-patch4-window7-224")
def swin_tiny(spec: BackboneSpec, **kw: Any) -> XrayClassifier:
    """Swin-T, 28M parameters: embed 96, depths 2-2-6-2, heads 3-6-12-24."""
    return SwinClassifier.build(
        spec, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), **kw
    )


@_swin("swin_small", pretrained_hint="microsoft/swin-small-patch4-window7-224")
def swin_small(spec: BackboneSpec, **kw: Any) -> XrayClassifier:
    """Swin-S, 50M parameters: embed 96, depths 2-2-18-2, heads 3-6-12-24."""
    return SwinClassifier.build(
        spec, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), **kw
    )


@_swin("swin_base", pretrained_hint="microsoft/swin-base-patch4-window7-224")
def swin_base(spec: BackboneSpec, **kw: Any) -> XrayClassifier:
    """Swin-B, 88M parameters: embed 128, depths 2-2-18-2, heads 4-8-16-32."""
    return SwinClassifier.build(
        spec, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), **kw
    )


@_swin("swin_test")
def swin_test(spec: BackboneSpec, **kw: Any) -> XrayClassifier:
    """Tiny Swin for tests: embed 8, depths 1-1-2-1 (the 2 exercises shifted windows)."""
    return SwinClassifier.build(
        spec, embed_dim=8, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2), **kw
    )


@_maxvit("maxvit_tiny", pretrained_hint="timm/maxvit_tiny_tf_224.in1k")
def maxvit_tiny(spec: BackboneSpec, **kw: Any) -> XrayClassifier:
    """MaxViT-T (timm maxvit_tiny_tf_224), 31M parameters."""
    return MaxVitClassifier.build(spec, variant="maxvit_tiny_tf_224", **kw)


@_maxvit("maxvit_small", pretrained_hint="timm/maxvit_small_tf_224.in1k")
def maxvit_small(spec: BackboneSpec, **kw: Any) -> XrayClassifier:
    """MaxViT-S (timm maxvit_small_tf_224), 69M parameters."""
    return MaxVitClassifier.build(spec, variant="maxvit_small_tf_224", **kw)


@_maxvit("maxvit_base", pretrained_hint="timm/maxvit_base_tf_224.in1k")
def maxvit_base(spec: BackboneSpec, **kw: Any) -> XrayClassifier:
    """MaxViT-B (timm maxvit_base_tf_224), 119M parameters."""
    return MaxVitClassifier.build(spec, variant="maxvit_base_tf_224", **kw)


@_maxvit("maxvit_test")
def maxvit_test(spec: BackboneSpec, **kw: Any) -> XrayClassifier:
    """Tiny MaxViT for tests: the maxvit_tiny_tf block design at embed 8-16-16-24, depth 1."""
    from timm.models.maxxvit import model_cfgs

    tiny = model_cfgs["maxvit_tiny_tf"]
    cfg = dataclasses.replace(
        tiny,
        embed_dim=(8, 16, 16, 24),
        depths=(1, 1, 1, 1),
        stem_width=8,
        head_hidden_size=24,
        transformer_cfg=dataclasses.replace(tiny.transformer_cfg, dim_head=8),
    )
    return MaxVitClassifier.build(spec, cfg=cfg, **kw)


@_maxvit("maxvit_pico")
def maxvit_pico(spec: BackboneSpec, **kw: Any) -> XrayClassifier:
    """MaxViT small enough to train from scratch on 2 CPU cores: the maxvit_tiny_tf block design
    at embed 16-32-48-64, depths 1-1-2-1, 16-dim heads (0.36M parameters; about twice the step
    cost of ``maxvit_test``). The backbone of ``configs/cpu_reference.yaml``."""
    from timm.models.maxxvit import model_cfgs

    tiny = model_cfgs["maxvit_tiny_tf"]
    cfg = dataclasses.replace(
        tiny,
        embed_dim=(16, 32, 48, 64),
        depths=(1, 1, 2, 1),
        stem_width=16,
        head_hidden_size=64,
        transformer_cfg=dataclasses.replace(tiny.transformer_cfg, dim_head=16),
    )
    return MaxVitClassifier.build(spec, cfg=cfg, **kw)


@_vit("vit_base_patch16", pretrained_hint="google/vit-base-patch16-224-in21k")
def vit_base_patch16(spec: BackboneSpec, **kw: Any) -> XrayClassifier:
    """ViT-B/16, 86M parameters: hidden 768, 12 layers, 12 heads."""
    return VitClassifier.build(
        spec, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, **kw
    )


@_vit("vit_test")
def vit_test(spec: BackboneSpec, **kw: Any) -> XrayClassifier:
    """Tiny ViT/16 for tests: hidden 32, 4 layers, 2 heads."""
    return VitClassifier.build(
        spec, hidden_size=32, num_layers=4, num_heads=2, intermediate_size=64, **kw
    )


@_resnet("resnet50", pretrained_hint="timm/resnet50.a1_in1k")
def resnet50(spec: BackboneSpec, **kw: Any) -> XrayClassifier:
    """ResNet-50 (timm), 24M parameters without the ImageNet classifier."""
    return ResNetClassifier.build(spec, variant="resnet50", **kw)


@_resnet("resnet50_test")
def resnet50_test(spec: BackboneSpec, **kw: Any) -> XrayClassifier:
    """Tiny bottleneck ResNet for tests: one block per stage, widths 4-8-16-32."""
    from timm.models.resnet import Bottleneck

    return ResNetClassifier.build(
        spec,
        resnet_kwargs=dict(
            block=Bottleneck, layers=(1, 1, 1, 1), channels=(4, 8, 16, 32), stem_width=8
        ),
        **kw,
    )
