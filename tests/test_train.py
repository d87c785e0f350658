"""Config, splits, freezing, AMP choice, and `xraycls train` end to end on real images."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from xraycls.errors import ConfigError
from xraycls.evaluation.splits import grouped_subset, inner_split, patient_folds
from xraycls.models.runtime import Amp, resolve_amp
from xraycls.training.config import Config, StageConfig, load_config
from xraycls.training.engine import build_optimizer, set_trainable

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------- config


def test_shipped_configs_validate() -> None:
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.model.image_size % 32 == 0, path


def test_unknown_keys_are_errors(tmp_path: Path) -> None:
    bad = tmp_path / "c.yaml"
    bad.write_text("model:\n  name: resnet50\n  imagesize: 224\n")
    with pytest.raises(ConfigError, match=r"model\.imagesize"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"train\.batchsize"):
        load_config(None, ["train.batchsize=4"])


def test_overrides_are_typed_and_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(
        REPO / "configs" / "smoke.yaml",
        [
            "model.name=resnet50_test",
            "train.batch_size=3",
            "cv.folds=3",
            "train.stages=[{epochs: 1, train: head, lr: 0.01}]",
        ],
    )
    assert (cfg.model.name, cfg.train.batch_size, cfg.cv.folds) == ("resnet50_test", 3, 3)
    assert load_config(None, ["train.amp=off"]).train.amp == "off"  # YAML's boolean `off`
    assert cfg.train.stages == [StageConfig(epochs=1, train="head", lr=0.01)]
    saved = tmp_path / "config.yaml"
    saved.write_text(cfg.to_yaml())
    assert load_config(saved) == cfg


def test_bad_values_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"model\.image_size"):
        load_config(None, ["model.image_size=100"])
    with pytest.raises(ConfigError, match="train"):
        load_config(None, ["train.stages=[{epochs: 1, train: some, lr: 0.1}]"])
    with pytest.raises(ConfigError, match=r"expected key\.path=value"):
        load_config(None, ["model.name"])


# ------------------------------------------------------------------- splits


def test_no_patient_in_two_folds_and_labels_stratified() -> None:
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(120), rng.integers(1, 4, 120))
    labels = (groups % 3 == 0).astype(int)
    fold = patient_folds(labels, groups, folds=5, seed=1)
    assert set(fold) == set(range(5))
    for g in np.unique(groups):
        assert len(set(fold[groups == g])) == 1
    rates = [labels[fold == k].mean() for k in range(5)]
    assert max(rates) - min(rates) < 0.15
    tr, va = inner_split(labels, groups, fraction=0.2, seed=0)
    assert not set(groups[tr]) & set(groups[va]) and len(tr) + len(va) == len(labels)
    sub = grouped_subset(labels, groups, n=60, seed=0)
    assert 30 <= len(sub) <= 90
    for g in np.unique(groups[sub]):  # whole patients only
        assert np.sum(groups[sub] == g) == np.sum(groups == g)


# ------------------------------------------------------------------- freezing and AMP


def test_frozen_parameters_get_no_gradients() -> None:
    from xraycls.models import create_model

    model = create_model("resnet50_test", num_classes=2, image_size=64)
    stages = model.stages()
    for spec, trained_stages in (("head", 0), ("last_stages(1)", 1), ("all", len(stages))):
        params = set_trainable(model, spec)
        opt = build_optimizer(model, StageConfig(epochs=1, train=spec, lr=1e-3, layer_decay=0.5))
        assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in params}
        model.zero_grad(set_to_none=True)
        model(torch.randn(2, 3, 64, 64)).sum().backward()
        frozen = stages[: len(stages) - trained_stages]
        assert all(p.grad is None for m in frozen for p in m.parameters()), spec
        assert all(p.grad is not None for p in model.head.parameters())
        trained = stages[len(stages) - trained_stages :]
        assert all(p.grad is not None for m in trained for p in m.parameters()), spec
    # layer decay: the stem learns slowest, the head at the base rate
    lrs = sorted({g["lr"] for g in opt.param_groups})
    assert lrs[-1] == pytest.approx(1e-3) and lrs[0] == pytest.approx(1e-3 * 0.5 ** len(stages))


def test_amp_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    import xraycls.models.runtime as engine

    cpu = torch.device("cpu")
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: False)  # AVX2 only
    assert resolve_amp("auto", cpu) == Amp(None, False, "cpu")
    assert resolve_amp("off", cpu).dtype is None
    with pytest.warns(UserWarning, match="slower"):
        assert resolve_amp("bf16", cpu).dtype == torch.bfloat16
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: True)  # AMX / AVX512-BF16
    assert resolve_amp("auto", cpu) == Amp(torch.bfloat16, False, "cpu")
    assert resolve_amp("off", cpu).dtype is None
    with pytest.raises(ValueError, match="CUDA"):
        resolve_amp("fp16", cpu)
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_amp("auto", cuda) == Amp(torch.float16, True, "cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_amp("auto", cuda) == Amp(torch.bfloat16, False, "cuda")


# ------------------------------------------------------------------- end to end on real images


def _smoke_cfg(shared: Path, *extra: str) -> Config:
    labels = shared / "cxr-pneumonia-224" / "sample-1000.csv"
    return load_config(REPO / "configs" / "smoke.yaml", [f"data.labels={labels}", *extra])


def test_smoke_train_writes_a_valid_bundle(shared_data: Path, tmp_path: Path) -> None:
    from xraycls.models import create_model
    from xraycls.models.weights import load_weights, normalization_for
    from xraycls.training.crossval import preprocessing_for, run_training
    from xraycls.training.data import XrayDataset, load_table
    from xraycls.training.engine import predict

    cfg = _smoke_cfg(shared_data)
    out = tmp_path / "run"
    result = run_training(cfg, out, log=lambda m: None)
    for name in (
        "config.yaml",
        "labels.json",
        "metrics.json",
        "oof_predictions.csv",
        "bundle.json",
        "training_curves.png",
        "log.csv",
        "folds.csv",
        "fold0/weights.safetensors",
        "fold1/weights.safetensors",
    ):
        assert (out / name).is_file(), name
    assert load_config(out / "config.yaml") == cfg
    metrics = json.loads((out / "metrics.json").read_text())
    assert (out / "calibration.json").is_file()
    card = (out / "MODEL_CARD.md").read_text()
    assert "Not a medical device" in card and "floor: logistic regression on 32x32 pixels" in card
    assert "DeLong p =" in card and "Top-label ECE" in card and "calibration slope" in card
    assert "on patients none of its models saw" in card
    assert 0.0 <= metrics["pooled_oof"]["auroc"] <= 1.0 and len(metrics["folds"]) == 2
    assert 0.5 < metrics["floor_logreg_32px"]["auroc"] <= 1.0  # the 32x32 floor, same folds
    assert result.metrics["n_images"] == metrics["n_images"]
    with (out / "oof_predictions.csv").open() as f:
        oof = list(csv.DictReader(f))
    assert len(oof) == metrics["n_images"] and {r["fold"] for r in oof} == {"0", "1"}
    folds = {}
    for r in oof:
        folds.setdefault(r["patient_id"], set()).add(r["fold"])
    assert all(len(v) == 1 for v in folds.values())  # patient-level split
    assert all(abs(float(r["prob_NORMAL"]) + float(r["prob_PNEUMONIA"]) - 1) < 1e-5 for r in oof)

    # The saved fold weights reproduce the stored out-of-fold logits (safetensors, no pickle).
    prep = preprocessing_for(cfg)
    table = load_table(cfg.data, prep, seed=cfg.seed)
    fold0 = [
        i
        for i, p in enumerate(table.paths)
        if any(r["path"] == p and r["fold"] == "0" for r in oof)
    ]
    model = create_model(cfg.model.name, num_classes=2, image_size=cfg.model.image_size)
    model.load_state_dict(load_weights(out / "fold0" / "weights.safetensors"))
    ds = XrayDataset(
        table.subset(np.array(fold0)), prep, normalization=normalization_for(cfg.model.name)
    )
    loader = torch.utils.data.DataLoader(ds, batch_size=8)
    logits, _, _ = predict(model, loader, amp=Amp(None, False, "cpu"), device=torch.device("cpu"))
    stored = np.array(
        [[float(r["logit_NORMAL"]), float(r["logit_PNEUMONIA"])] for r in oof if r["fold"] == "0"]
    )
    by_path = {r["path"]: i for i, r in enumerate(r for r in oof if r["fold"] == "0")}
    order = [by_path[table.paths[i]] for i in fold0]
    assert np.allclose(logits, stored[order], atol=1e-4), np.abs(logits - stored[order]).max()

    # The served fold ensemble was calibrated on the holdout, which no model trained on; the
    # CLI refits it with another method.
    from xraycls.cli import app

    cal = json.loads((out / "calibration.json").read_text())
    folds_csv = list(csv.DictReader((out / "folds.csv").open()))
    held = {r["path"] for r in folds_csv if r["fold"] == "holdout"}
    assert held and not held & {r["path"] for r in oof}  # never in any fold
    entry = cal["configurations"]["folds"]
    assert cal["default"] == "folds" and entry["data"]["n_images"] == len(held)
    assert entry["method"] in ("temperature", "platt")
    assert set(entry["selection"]["candidates"]) == {"temperature", "platt"}
    assert metrics["served"]["configurations"]["folds"]["ece"]["value"] >= 0
    res = CliRunner().invoke(
        app, ["calibrate", str(out), "--method", "platt", "--target", "youden"]
    )
    assert res.exit_code == 0, res.output
    entry = json.loads((out / "calibration.json").read_text())["configurations"]["folds"]
    assert entry["method"] == "platt" and entry["threshold"]["target"] == "youden"
    res = CliRunner().invoke(app, ["calibrate", str(tmp_path)])
    assert res.exit_code == 2 and "not a complete run bundle" in " ".join(res.output.split())

    # Re-running the same config resumes (nothing to redo); a different config is refused.
    again = run_training(cfg, out, log=lambda m: None)
    assert json.dumps(again.metrics["pooled_oof"], sort_keys=True) == json.dumps(
        metrics["pooled_oof"], sort_keys=True
    )
    with pytest.raises(ConfigError, match="different config"):
        run_training(_smoke_cfg(shared_data, "seed=1"), out, log=lambda m: None)


def test_resume_after_interruption_matches_an_uninterrupted_run(
    shared_data: Path, tmp_path: Path
) -> None:
    from xraycls.training.crossval import run_training

    stages = (
        "train.stages=[{epochs: 1, train: head, lr: 0.001}, {epochs: 1, train: all, lr: 0.0005}]"
    )
    cfg = _smoke_cfg(shared_data, stages, "augment.enabled=true")
    straight = run_training(cfg, tmp_path / "a", log=lambda m: None)

    def interrupt(msg: str) -> None:
        if msg.startswith("fold1 epoch 2"):
            raise KeyboardInterrupt  # in fold 1's second epoch, after the first one's checkpoint

    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, tmp_path / "b", log=interrupt)
    messages: list[str] = []
    resumed = run_training(cfg, tmp_path / "b", log=messages.append)
    assert "fold0: already trained, reusing" in messages
    assert "fold1: resuming after epoch 1" in messages
    assert not any(m.startswith("fold1 epoch 1") for m in messages)
    # fold 1's second epoch was logged, killed before its checkpoint, and ran again: one row.
    log = [(r["model"], r["epoch"]) for r in csv.DictReader((tmp_path / "b" / "log.csv").open())]
    assert len(log) == len(set(log)) == 4, log
    assert resumed.metrics["pooled_oof"]["auroc"] == pytest.approx(
        straight.metrics["pooled_oof"]["auroc"], abs=1e-6
    )


def test_select_last_keeps_the_end_of_the_schedule(shared_data: Path, tmp_path: Path) -> None:
    from xraycls.training.crossval import run_training

    three = "train.stages=[{epochs: 3, train: all, lr: 0.001}]"
    messages: list[str] = []
    cfg = _smoke_cfg(shared_data, three, "train.early_stopping_patience=1", "train.select=last")
    result = run_training(cfg, tmp_path / "r", log=messages.append)
    rows = list(csv.DictReader((tmp_path / "r" / "log.csv").open()))
    # patience 1 is ignored: every fold runs its 3 epochs and keeps the third.
    assert [(r["model"], r["epoch"]) for r in rows] == [
        (f"fold{k}", str(e)) for k in range(2) for e in range(3)
    ]
    assert [f["best_epoch"] for f in result.metrics["folds"]] == [2, 2]
    assert not any("early stop" in m for m in messages)


def test_select_best_keeps_the_best_inner_epoch_weights(tmp_path: Path) -> None:
    from xraycls.models.weights import load_weights
    from xraycls.training.fold import _update_state

    model = torch.nn.Linear(2, 1)
    state = {"best_score": -float("inf"), "best_epoch": -1, "bad_epochs": 0}
    state |= {"train_seconds": 0.0, "train_images": 0}
    tr = {"seconds": 1.0, "images": 4}
    for keep_last in (False, True):
        for epoch, auroc in enumerate([0.9, 0.7]):  # the second epoch is worse
            torch.nn.init.constant_(model.weight, float(epoch))
            val = {"auroc": auroc, "loss": 0.5}
            _update_state(state, tr, val, epoch, 0, True, model, tmp_path, keep_last=keep_last)
        kept = load_weights(tmp_path / "best.safetensors")["weight"]
        assert state["best_epoch"] == (1 if keep_last else 0)
        assert torch.equal(kept, torch.full_like(kept, 1.0 if keep_last else 0.0))
        state.update(best_score=-float("inf"), best_epoch=-1, bad_epochs=0)


def test_cli_train_smoke(shared_data: Path, tmp_path: Path) -> None:
    from xraycls.cli import app

    labels = shared_data / "cxr-pneumonia-224" / "sample-1000.csv"
    res = CliRunner().invoke(
        app,
        [
            "train",
            "--config",
            str(REPO / "configs" / "smoke.yaml"),
            "--set",
            f"data.labels={labels}",
            "--set",
            "model.name=resnet50_test",
            "--out",
            str(tmp_path / "r"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "pooled OOF AUROC" in res.stdout
    res = CliRunner().invoke(
        app, ["train", "--config", str(REPO / "configs" / "smoke.yaml"), "--set", "model.nme=x"]
    )
    assert res.exit_code == 2 and "model.nme" in res.output


def test_three_class_subtype_task(shared_data: Path, tmp_path: Path) -> None:
    from xraycls.training.crossval import run_training

    cfg = _smoke_cfg(
        shared_data, "data.label_column=subtype", "model.name=vit_test", "data.limit=45"
    )
    result = run_training(cfg, tmp_path / "r", log=lambda m: None)
    m = result.metrics["pooled_oof"]
    assert result.metrics["classes"] == ["bacteria", "normal", "virus"]
    assert set(m["per_class"]) >= {"auroc_bacteria", "auroc_normal", "auroc_virus"}
    assert json.loads((tmp_path / "r" / "labels.json").read_text())["positive"] is None
