"""Backbone registry, the XrayClassifier contract and pretrained loading, on tiny CPU models.

The ``*_test`` backbones run the real classes with toy dimensions; the ``slow`` test builds the
real families at 1024² (``pytest -m slow``).
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from xraycls.models import (
    PretrainedWeightsError,
    XrayClassifier,
    create_model,
    get_spec,
    list_backbones,
    window_size_for,
)

TINY = ["swin_test", "maxvit_test", "vit_test", "resnet50_test"]
REAL = ["swin_tiny", "maxvit_tiny", "vit_base_patch16", "resnet50"]
SCRATCH = ["maxvit_pico"]  # no pretrained checkpoint exists: trained from scratch on CPUs
ALL = [
    *("swin_tiny", "swin_small", "swin_base", "maxvit_tiny", "maxvit_small", "maxvit_base"),
    *("vit_base_patch16", "resnet50", *SCRATCH, *TINY),
]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _backbone_state(model: XrayClassifier) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.backbone.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], skip: set[str]) -> None:
    assert a.keys() == b.keys()
    for k in a.keys() - skip:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------ registry


def test_list_backbones_has_every_family_and_tiny_variant() -> None:
    assert sorted(ALL) == list_backbones()
    assert {get_spec(n).family for n in ALL} == {"swin", "maxvit", "vit", "resnet"}
    assert [n for n in ALL if get_spec(n).is_test] == TINY
    assert all(get_spec(n).pretrained_hint for n in ALL if n not in TINY + SCRATCH)
    assert not any(get_spec(n).pretrained_hint for n in SCRATCH)


def test_spec_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_spec("swin_tiny").family = "vit"  # type: ignore[misc]


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'swin_huge'") as err:
        create_model("swin_huge", num_classes=2)
    assert all(name in str(err.value) for name in ALL)


@pytest.mark.parametrize("size", [100, 1000, 16, 0])
def test_image_size_must_be_a_multiple_of_32(size: int) -> None:
    with pytest.raises(ValueError, match="image_size must be"):
        create_model("resnet50_test", num_classes=2, image_size=size)


def test_import_xraycls_stays_light() -> None:
    code = "import sys, xraycls; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------ windows


def test_window_rule() -> None:
    assert window_size_for(224) == 7
    assert window_size_for(1024) == 8
    assert window_size_for(512) == 8
    assert window_size_for(384) == 12
    for size in range(32, 2049, 32):
        window = window_size_for(size)
        assert all((size // stride) % window == 0 for stride in (4, 8, 16, 32)), size
        assert window >= min(7, size // 32), size


def test_swin_and_maxvit_use_the_window_rule() -> None:
    swin = create_model("swin_tiny", num_classes=2, image_size=1024)
    assert swin.backbone.config.window_size == 8
    assert create_model("swin_test", num_classes=2, image_size=224).window_size == 7
    maxvit = create_model("maxvit_tiny", num_classes=2, image_size=1024)
    for stage in maxvit.backbone.stages:
        block = stage.blocks[0]
        assert block.attn_block.partition_size == block.attn_grid.partition_size == (8, 8)


# ------------------------------------------------------------------------------ contract


@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_backward(name: str) -> None:
    model = create_model(name, num_classes=3, image_size=64)
    assert 1_000 < sum(p.numel() for p in model.parameters()) < 150_000
    logits = model(torch.randn(2, 3, 64, 64))
    assert type(logits) is torch.Tensor and logits.shape == (2, 3)
    logits.sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("size", [64, 96])
def test_cam_target_gives_an_nchw_map_for_the_current_size(name: str, size: int) -> None:
    model = create_model(name, num_classes=2, image_size=size).eval()
    seen: list[torch.Tensor] = []
    model.cam_target_layer().register_forward_hook(lambda m, i, out: seen.append(out))
    model(torch.randn(2, 3, size, size))
    reshape = model.cam_reshape()
    fmap = seen[0] if reshape is None else reshape(seen[0])
    side = size // get_spec(name).feature_stride
    assert fmap.ndim == 4 and fmap.shape[0] == 2 and fmap.shape[2:] == (side, side)


def test_cpu_reference_backbone_trains_at_its_recipe_size() -> None:
    # configs/cpu_reference.yaml trains maxvit_pico from scratch at 128 px: a real step there.
    model = create_model("maxvit_pico", num_classes=3, image_size=128).train()
    assert 300_000 < sum(p.numel() for p in model.parameters()) < 400_000
    logits = model(torch.randn(2, 3, 128, 128))
    assert logits.shape == (2, 3)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", TINY)
def test_stages_hold_every_backbone_parameter_once(name: str) -> None:
    model = create_model(name, num_classes=2, image_size=64)
    stages = model.stages()
    assert len(stages) >= 4
    ids = [id(p) for stage in stages for p in stage.parameters()]
    head = {id(p) for p in model.head.parameters()}
    assert len(ids) == len(set(ids)), "a parameter is in two stages"
    assert set(ids) == {id(p) for p in model.parameters()} - head


@pytest.mark.parametrize("name", TINY)
def test_grad_checkpointing_recomputes_and_changes_nothing(name: str) -> None:
    model = create_model(name, num_classes=2, image_size=64).train()
    x = torch.randn(2, 3, 64, 64)
    # A leaf inside the first stage after the stem runs again in the backward when checkpointed.
    leaf = next(m for m in model.stages()[1].modules() if not list(m.children()))
    calls: list[int] = []
    leaf.register_forward_hook(lambda m, i, o: calls.append(1))

    def step() -> tuple[torch.Tensor, list[torch.Tensor], int]:
        model.zero_grad()
        calls.clear()
        out = model(x)
        out.sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()], len(calls)

    out_off, grads_off, calls_off = step()
    model.set_grad_checkpointing(True)
    out_on, grads_on, calls_on = step()
    assert model.grad_checkpointing and calls_on == 2 * calls_off
    torch.testing.assert_close(out_on, out_off)
    for g_on, g_off in zip(grads_on, grads_off, strict=True):
        torch.testing.assert_close(g_on, g_off)


def test_grad_checkpointing_option_of_create_model() -> None:
    assert create_model(
        "vit_test", num_classes=2, image_size=64, grad_checkpointing=True
    ).grad_checkpointing


def test_channels_last_preference() -> None:
    assert create_model("resnet50_test", num_classes=2, image_size=64).channels_last_preferred
    assert not create_model("swin_test", num_classes=2, image_size=64).channels_last_preferred


# ------------------------------------------------------------------------------ pretrained


def test_vit_position_embeddings_are_interpolated_once_at_load(tmp_path: Path) -> None:
    src = create_model("vit_test", num_classes=2, image_size=224)  # a 14x14 grid, like ImageNet
    src.backbone.save_pretrained(tmp_path)
    before = _backbone_state(src)

    big = create_model("vit_test", num_classes=2, image_size=512, pretrained=tmp_path)
    after = _backbone_state(big)
    key = "embeddings.position_embeddings"
    assert after[key].shape == (1, 1 + 32 * 32, 32)
    assert torch.equal(after[key][:, 0], before[key][:, 0]), "CLS position embedding changed"
    _assert_same(before, after, skip={key})
    assert big(torch.randn(1, 3, 512, 512)).shape == (1, 2)

    same = create_model("vit_test", num_classes=2, image_size=224, pretrained=tmp_path)
    _assert_same(before, _backbone_state(same), skip=set())


# Key names of transformers 4.x checkpoints, as on the Hub (google/vit-*, microsoft/swin-*).
_QKV = {"q": "query", "k": "key", "v": "value"}
LEGACY_KEYS = {
    "vit_test": [
        (r"vit\.layers\.", "vit.encoder.layer."),
        (r"attention\.([qkv])_proj", lambda m: f"attention.attention.{_QKV[m[1]]}"),
        (r"attention\.o_proj", "attention.output.dense"),
        (r"mlp\.fc1", "intermediate.dense"),
        (r"mlp\.fc2", "output.dense"),
    ],
    "swin_test": [
        (
            r"relative_position_bias\.relative_position_bias_table",
            "self.relative_position_bias_table",
        ),
        (r"attention\.([qkv])_proj", lambda m: f"attention.self.{_QKV[m[1]]}"),
        (r"attention\.o_proj", "attention.output.dense"),
        (r"mlp\.fc1", "intermediate.dense"),
        (r"mlp\.fc2", "output.dense"),
    ],
}


@pytest.mark.parametrize("name", ["vit_test", "swin_test"])
def test_legacy_hub_layout_loads_without_its_classifier(name: str, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import SwinForImageClassification, ViTForImageClassification

    src = create_model(name, num_classes=2, image_size=224)
    task_cls = ViTForImageClassification if name == "vit_test" else SwinForImageClassification
    task = task_cls(src.backbone.config)  # an ImageNet-style task model, classifier included
    task.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    legacy = {}
    for key, value in load_file(weights).items():
        for pattern, new in LEGACY_KEYS[name]:
            key = re.sub(pattern, new, key)
        legacy[key] = value
    save_file(legacy, weights)
    assert any(k.startswith("classifier.") for k in legacy)

    model = create_model(name, num_classes=3, image_size=224, pretrained=tmp_path)
    base = task.vit if name == "vit_test" else task.swin
    expected = {k: v for k, v in base.state_dict().items() if not k.startswith("pooler.")}
    _assert_same(expected, _backbone_state(model), skip=set())


def test_swin_relative_position_tables_follow_the_window(tmp_path: Path) -> None:
    src = create_model("swin_test", num_classes=2, image_size=224)  # window 7
    src.backbone.save_pretrained(tmp_path)
    before = _backbone_state(src)

    big = create_model("swin_test", num_classes=2, image_size=256, pretrained=tmp_path)
    assert big.window_size == 8
    after = _backbone_state(big)
    tables = {k for k in after if k.endswith("relative_position_bias_table")}
    assert len(tables) == 5
    for k in tables:
        assert before[k].shape == (13 * 13, before[k].shape[1])
        assert after[k].shape == (15 * 15, before[k].shape[1])
    _assert_same(before, after, skip=tables)
    bias = big.backbone.encoder.layers[0].blocks[0].attention.relative_position_bias
    assert bias.relative_position_index.max() == 15 * 15 - 1  # rebuilt for the new window
    assert big(torch.randn(1, 3, 256, 256)).shape == (1, 2)

    same = create_model("swin_test", num_classes=2, image_size=224, pretrained=tmp_path)
    _assert_same(before, _backbone_state(same), skip=set())


def test_hf_directory_of_another_architecture_is_refused(tmp_path: Path) -> None:
    from transformers import SwinModel

    src = create_model("swin_test", num_classes=2, image_size=64)
    SwinModel(dataclasses.replace(src.backbone.config, embed_dim=16)).save_pretrained(tmp_path)
    with pytest.raises(PretrainedWeightsError, match=r"another architecture.*embed_dim=16"):
        create_model("swin_test", num_classes=2, image_size=64, pretrained=tmp_path)


@pytest.mark.parametrize("name", ["maxvit_test", "resnet50_test"])
def test_timm_safetensors_file_round_trips(name: str, tmp_path: Path) -> None:
    src = create_model(name, num_classes=2, image_size=64)
    before = _backbone_state(src)
    # What timm checkpoints look like: the backbone plus an ImageNet classifier.
    classifier = "head.fc" if name.startswith("maxvit") else "fc"
    extra = {f"{classifier}.weight": torch.zeros(1000, src.num_features)}
    save_file({**before, **extra}, tmp_path / "model.safetensors")

    for source in (tmp_path / "model.safetensors", tmp_path):
        model = create_model(name, num_classes=4, image_size=64, pretrained=source)
        _assert_same(before, _backbone_state(model), skip=set())
        assert model.head.out_features == 4


def test_maxvit_tables_follow_the_partition_size(tmp_path: Path) -> None:
    src = create_model("maxvit_test", num_classes=2, image_size=96)  # partition 3
    save_file(_backbone_state(src), tmp_path / "w.safetensors")
    model = create_model(
        "maxvit_test", num_classes=2, image_size=64, pretrained=tmp_path / "w.safetensors"
    )
    after = _backbone_state(model)
    tables = {k for k in after if k.endswith("relative_position_bias_table")}
    assert tables and all(after[k].shape[1:] == (3, 3) for k in tables)
    _assert_same(_backbone_state(src), after, skip=tables)


def test_xray_classifier_weights_load_as_backbone(tmp_path: Path) -> None:
    src = create_model("swin_test", num_classes=2, image_size=64)
    save_file(src.state_dict(), tmp_path / "run.safetensors")
    model = create_model(
        "swin_test", num_classes=7, image_size=64, pretrained=tmp_path / "run.safetensors"
    )
    _assert_same(_backbone_state(src), _backbone_state(model), skip=set())


def test_mismatched_or_missing_tensors_raise(tmp_path: Path) -> None:
    state = _backbone_state(create_model("resnet50_test", num_classes=2, image_size=64))
    bad = dict(state, **{"layer1.0.conv1.weight": torch.zeros(5, 8, 1, 1)})
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(PretrainedWeightsError, match=r"do not fit.*layer1\.0\.conv1\.weight"):
        create_model(
            "resnet50_test", num_classes=2, image_size=64, pretrained=tmp_path / "bad.safetensors"
        )
    del state["layer4.0.bn3.weight"]
    save_file(dict(state, extra=torch.zeros(1)), tmp_path / "partial.safetensors")
    with pytest.raises(
        PretrainedWeightsError, match=r"missing 1: layer4\.0\.bn3\.weight.*unexpected 1: extra"
    ):
        create_model(
            "resnet50_test",
            num_classes=2,
            image_size=64,
            pretrained=tmp_path / "partial.safetensors",
        )


def test_pickles_and_missing_paths_are_refused(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(PretrainedWeightsError, match="pickled"):
        create_model(
            "resnet50_test", num_classes=2, image_size=64, pretrained=tmp_path / "weights.bin"
        )
    with pytest.raises(PretrainedWeightsError, match="no such file"):
        create_model(
            "resnet50_test", num_classes=2, image_size=64, pretrained=tmp_path / "nope.safetensors"
        )


@pytest.mark.parametrize("name", ["swin_test", "resnet50_test"])
def test_hub_id_offline_fails_fast_with_instructions(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(PretrainedWeightsError) as err:
        create_model(
            name, num_classes=2, image_size=64, pretrained="xraycls-tests/not-cached-anywhere"
        )
    assert time.perf_counter() - start < 5
    message = str(err.value)
    assert (
        "HF_HUB_OFFLINE" in message and "hf download xraycls-tests/not-cached-anywhere" in message
    )
    assert "pretrained=DIR" in message


# ------------------------------------------------------------------------------ real sizes


@pytest.mark.slow
@pytest.mark.parametrize("name", REAL)
def test_real_family_trains_one_step_at_1024(name: str) -> None:
    torch.set_num_threads(2)
    model = create_model(name, num_classes=14, image_size=1024)
    x = torch.randn(1, 3, 1024, 1024)
    if model.channels_last_preferred:
        model, x = (
            model.to(memory_format=torch.channels_last),
            x.to(memory_format=torch.channels_last),
        )
    start = time.perf_counter()
    logits = model(x)
    forward_s = time.perf_counter() - start
    logits.sum().backward()
    total_s = time.perf_counter() - start
    print(
        f"\n{name} @1024, first step: forward {forward_s:.1f} s, forward+backward {total_s:.1f} s"
    )
    assert logits.shape == (1, 14)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
