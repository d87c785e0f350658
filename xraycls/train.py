"""``xraycls train``: patient-grouped cross-validation that leaves a run bundle.

Protocol, per outer fold k: the other folds are split again by patient into training and an
inner validation set (``train.inner_val_fraction``); the inner set alone drives early stopping
and the choice of checkpoint, and fold k is predicted once, by the chosen model. Pooled
out-of-fold (OOF) predictions are therefore never used to choose anything, which keeps the
reported AUROC honest (and leaves them clean for fitting a calibrator later).

Resumable: a finished fold is never retrained; an interrupted fold continues from its last
epoch checkpoint. Re-running with the same ``--out`` and config resumes; a different config in
an existing run folder is refused.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from xraycls import __version__
from xraycls.bundle import calibrate_run
from xraycls.checkpoint import load_checkpoint, load_weights, save_checkpoint, save_weights
from xraycls.config import Config
from xraycls.cv import inner_split, patient_folds
from xraycls.data import Table, XrayDataset, load_table, normalization_for, preflight, worker_init
from xraycls.engine import (
    Amp,
    StepSchedule,
    build_optimizer,
    class_weights,
    evaluate,
    iter_epochs,
    resolve_amp,
    resolve_device,
    set_trainable,
    train_one_epoch,
)
from xraycls.errors import ConfigError
from xraycls.floor import floor_features, floor_oof_probs
from xraycls.fsutil import write_json_atomic, write_text_atomic
from xraycls.metrics import classification_metrics
from xraycls.modelcard import write_model_card
from xraycls.preprocess import ImageCache, Preprocessing
from xraycls.viewer import store_intensity_reference

LOG_COLUMNS = [
    "model",
    "stage",
    "epoch",
    "train",
    "lr",
    "train_loss",
    "val_loss",
    "val_auroc",
    "seconds",
    "images_per_s",
]


@dataclass
class RunContext:
    """What every fold of a run shares."""

    cfg: Config
    out: Path
    table: Table
    prep: Preprocessing
    cache: ImageCache | None
    device: torch.device
    amp: Amp
    log: Callable[[str], None]
    progress: Any = None
    """A ``rich.progress.Progress`` for per-batch bars, or None."""


@dataclass
class TrainResult:
    """What ``xraycls train`` prints and returns."""

    out: Path
    metrics: dict[str, Any]
    seconds: float


def preprocessing_for(cfg: Config) -> Preprocessing:
    """The image preprocessing a config implies (also stored in the bundle)."""
    return Preprocessing(
        image_size=cfg.model.image_size, resize=cfg.data.resize, window=cfg.data.window
    )


def run_training(
    cfg: Config, out: str | Path, *, log: Callable[[str], None] = print, progress: Any = None
) -> TrainResult:
    """Cross-validate ``cfg`` and write the run bundle to ``out`` (resuming what is there).

    Raises:
        ConfigError: ``out`` holds a run made with a different config, or the data is unusable.
    """
    t0 = time.perf_counter()
    out = Path(out)
    _claim_run_dir(out, cfg)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    prep = preprocessing_for(cfg)
    cache = ImageCache(cfg.data.cache_dir) if cfg.data.cache_dir else None
    table = load_table(cfg.data, prep, seed=cfg.seed)
    table, excluded = preflight(table, prep, cache)
    _write_csv(out / "excluded.csv", excluded, ["path", "error"])
    if excluded:
        log(f"{len(excluded)} unreadable images excluded (see {out / 'excluded.csv'})")
    device = resolve_device(cfg.train.device)
    amp = resolve_amp(cfg.train.amp, device)
    ctx = RunContext(cfg, out, table, prep, cache, device, amp, log, progress)
    log(
        f"{len(table)} images, {len(np.unique(table.groups))} patients, classes {table.classes}; "
        f"{cfg.model.name} at {cfg.model.image_size}px on {device} ({amp.describe()}); {cfg.cv.folds}-fold CV"
    )

    folds = patient_folds(table.labels, table.groups, folds=cfg.cv.folds, seed=cfg.seed)
    _write_csv(
        out / "folds.csv",
        [
            {"path": p, "patient_id": g, "fold": int(f)}
            for p, g, f in zip(table.paths, table.groups, folds, strict=True)
        ],
        ["path", "patient_id", "fold"],
    )
    n_classes = len(table.classes)
    oof_logits = np.zeros((len(table), n_classes), dtype=np.float32)
    fold_metrics, timings = [], []
    for k in range(cfg.cv.folds):
        test = np.flatnonzero(folds == k)
        train = np.flatnonzero(folds != k)
        result = _fold(ctx, f"fold{k}", seed=cfg.seed + k, train_idx=train, test_idx=test)
        oof_logits[test] = result["logits"]
        m = classification_metrics(_softmax(result["logits"]), table.labels[test], table.classes)
        fold_metrics.append({"fold": k, **m, "best_epoch": result["best_epoch"]})
        timings.append(result["timing"])
        log(
            f"fold {k}: AUROC {m['auroc']:.4f}, accuracy {m['accuracy']:.4f} (best inner epoch {result['best_epoch']})"
        )

    if cfg.cv.refit:
        refit = _fold(
            ctx, "refit", seed=cfg.seed + 1000, train_idx=np.arange(len(table)), test_idx=None
        )
        save_weights(
            out / "weights.safetensors", load_weights(out / "refit" / "weights.safetensors")
        )
        timings.append(refit["timing"])

    probs = _softmax(oof_logits)
    pooled = classification_metrics(probs, table.labels, table.classes)
    feats = floor_features(table.paths, prep, cache=cache, cached=table.cached)
    floor_probs = floor_oof_probs(
        feats, table.labels, table.groups, folds, n_classes=n_classes, seed=cfg.seed
    )
    floor = classification_metrics(floor_probs, table.labels, table.classes)
    metrics = {
        "pooled_oof": pooled,
        "floor_logreg_32px": floor,
        "folds": fold_metrics,
        "mean_over_folds": {
            key: float(np.nanmean([f[key] for f in fold_metrics]))
            for key in (
                "auroc",
                "accuracy",
                "sensitivity",
                "specificity",
                "f1",
                "balanced_accuracy",
            )
        },
        "n_images": len(table),
        "n_patients": len(np.unique(table.groups)),
        "excluded": len(excluded),
        "classes": table.classes,
        "device": str(device),
        "amp": amp.describe(),
        "train_seconds_per_image": float(np.mean([t["train_seconds_per_image"] for t in timings])),
        "inference_seconds_per_image": float(
            np.mean(
                [
                    t["inference_seconds_per_image"]
                    for t in timings
                    if t["inference_seconds_per_image"]
                ]
            )
        ),
        "wall_seconds": time.perf_counter() - t0,
    }
    _write_oof(out / "oof_predictions.csv", table, folds, oof_logits, probs, floor_probs)
    write_json_atomic(out / "metrics.json", metrics)
    _write_bundle_meta(ctx)
    _plot_curves(out)
    if cfg.calibration.method != "none":
        cal = calibrate_run(
            out,
            method=cfg.calibration.method,
            threshold_target=cfg.calibration.threshold_target,
            threshold_value=cfg.calibration.threshold_value,
        )
        metrics["calibration"] = cal
        log(
            f"calibration ({cal['method']}, fitted on OOF logits): ECE {cal['before']['ece']:.4f} -> "
            f"{cal['after_crossfit']['ece']:.4f} (cross-fitted)"
        )
    write_model_card(out)
    store_intensity_reference(out, ctx.prep)  # for the viewer's out-of-distribution check
    log(
        f"pooled OOF AUROC {pooled['auroc']:.4f}, accuracy {pooled['accuracy']:.4f}; floor (logistic "
        f"regression on 32x32 pixels, same folds) AUROC {floor['auroc']:.4f} -> {out}"
    )
    return TrainResult(out, metrics, metrics["wall_seconds"])


def _fold(
    ctx: RunContext, name: str, *, seed: int, train_idx: np.ndarray, test_idx: np.ndarray | None
) -> dict[str, Any]:
    """Train one model (resuming), or load a finished one; predict ``test_idx``."""
    from xraycls.models import create_model

    cfg, table = ctx.cfg, ctx.table
    fold_dir = ctx.out / name
    done_file = fold_dir / "result.json"
    if done_file.exists():
        ctx.log(f"{name}: already trained, reusing")
        result = json.loads(done_file.read_text())
        result["logits"] = np.array(result["logits"], dtype=np.float32).reshape(
            -1, len(table.classes)
        )
        return result

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    sub = table.subset(train_idx)
    inner_tr, inner_val = inner_split(
        sub.labels, sub.groups, fraction=cfg.train.inner_val_fraction, seed=seed
    )
    norm = normalization_for(cfg.model.name)
    train_set = XrayDataset(
        sub.subset(inner_tr),
        ctx.prep,
        cache=ctx.cache,
        augment=cfg.augment,
        normalization=norm,
        seed=seed,
    )
    val_set = XrayDataset(sub.subset(inner_val), ctx.prep, cache=ctx.cache, normalization=norm)
    model = create_model(
        cfg.model.name,
        num_classes=len(table.classes),
        image_size=cfg.model.image_size,
        pretrained=cfg.model.pretrained,
        grad_checkpointing=cfg.model.grad_checkpointing,
    ).to(ctx.device)
    channels_last = _channels_last(cfg.train.channels_last, model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    weights = (
        class_weights(train_set.table.labels, len(table.classes))
        if cfg.train.class_weighting
        else None
    )
    loss_fn = torch.nn.CrossEntropyLoss(
        weight=None if weights is None else weights.to(ctx.device),
        label_smoothing=cfg.train.label_smoothing,
    )
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.amp.use_scaler)
    stages = cfg.train.stages
    steps_per_epoch = math.ceil(
        math.ceil(len(train_set) / cfg.train.batch_size) / cfg.train.accumulate
    )
    ckpt_dir = fold_dir / "checkpoint"
    state: dict[str, Any] = {
        "epoch": -1,
        "best_score": -math.inf,
        "best_epoch": -1,
        "bad_epochs": 0,
        "train_seconds": 0.0,
        "train_images": 0,
    }
    optimizer, opt_stage = None, None

    def optimizer_for(saved: dict[str, Any]) -> torch.optim.Optimizer:
        stage = stages[saved["stage"]]
        set_trainable(model, stage.train)
        return build_optimizer(model, stage)

    restored = load_checkpoint(
        ckpt_dir, model=model, optimizer_factory=optimizer_for, scaler=scaler
    )
    if restored is not None:
        state, optimizer = restored
        opt_stage = state["stage"]
        ctx.log(f"{name}: resuming after epoch {state['epoch'] + 1}")

    for g, s, e in iter_epochs(stages):
        if g <= state["epoch"]:
            continue
        stage = stages[s]
        last_stage = s == len(stages) - 1
        if opt_stage != s or optimizer is None:
            set_trainable(model, stage.train)
            optimizer, opt_stage = build_optimizer(model, stage), s
        schedule = StepSchedule(
            optimizer,
            total=stage.epochs * steps_per_epoch,
            warmup=int(stage.warmup_epochs * steps_per_epoch),
            start=e * steps_per_epoch,
        )
        torch.manual_seed(seed * 1000 + g)  # dropout / drop-path streams replay after a resume
        train_set.set_epoch(g)
        loader = _loader(train_set, cfg, shuffle=True, seed=seed * 1000 + g)
        bar = None
        if ctx.progress is not None:
            bar = ctx.progress.add_task(
                f"{name} epoch {g + 1} [{stage.train}]", total=len(loader), loss=float("nan")
            )

        def on_batch(loss: float, bar: Any = bar) -> None:
            if bar is not None:
                ctx.progress.update(bar, advance=1, loss=loss)

        tr = train_one_epoch(
            model,
            loader,
            optimizer,
            loss_fn=loss_fn,
            amp=ctx.amp,
            scaler=scaler,
            device=ctx.device,
            accumulate=cfg.train.accumulate,
            channels_last=channels_last,
            schedule=schedule,
            on_batch=on_batch,
        )
        if bar is not None:
            ctx.progress.remove_task(bar)
        val = evaluate(
            model,
            _loader(val_set, cfg),
            classes=table.classes,
            amp=ctx.amp,
            device=ctx.device,
            channels_last=channels_last,
        )
        score = val["auroc"] if not math.isnan(val["auroc"]) else -val["loss"]
        state["train_seconds"] += tr["seconds"]
        state["train_images"] += int(tr["images"])
        if score > state["best_score"]:
            state.update(best_score=score, best_epoch=g, bad_epochs=0)
            save_weights(fold_dir / "best.safetensors", model.state_dict())
        elif last_stage:
            state["bad_epochs"] += 1
        state.update(epoch=g, stage=s)
        _append_log(
            ctx.out / "log.csv",
            {
                "model": name,
                "stage": s,
                "epoch": g,
                "train": stage.train,
                "lr": f"{optimizer.param_groups[-1]['lr']:.3g}",
                "train_loss": f"{tr['loss']:.4f}",
                "val_loss": f"{val['loss']:.4f}",
                "val_auroc": f"{val['auroc']:.4f}",
                "seconds": f"{tr['seconds'] + val['seconds']:.1f}",
                "images_per_s": f"{tr['images'] / tr['seconds']:.2f}",
            },
        )
        ctx.log(
            f"{name} epoch {g + 1} [{stage.train}]: train loss {tr['loss']:.4f}, inner-val AUROC {val['auroc']:.4f} ({tr['seconds']:.0f} s)"
        )
        save_checkpoint(
            ckpt_dir, f"e{g}", model=model, optimizer=optimizer, scaler=scaler, state=state
        )
        if (
            last_stage
            and cfg.train.early_stopping_patience
            and state["bad_epochs"] >= cfg.train.early_stopping_patience
        ):
            ctx.log(f"{name}: early stop after epoch {g + 1}")
            break

    model.load_state_dict(load_weights(fold_dir / "best.safetensors"))
    save_weights(
        fold_dir / "weights.safetensors", model.state_dict(), metadata={"model": cfg.model.name}
    )
    logits = np.zeros((0, len(table.classes)), np.float32)
    infer_s = None
    if test_idx is not None and len(test_idx):
        test_set = XrayDataset(
            table.subset(test_idx), ctx.prep, cache=ctx.cache, normalization=norm
        )
        ev = evaluate(
            model,
            _loader(test_set, cfg),
            classes=table.classes,
            amp=ctx.amp,
            device=ctx.device,
            channels_last=channels_last,
        )
        order = np.argsort(ev["index"])
        logits = ev["logits"][order]
        infer_s = ev["seconds"] / len(test_idx)
    result = {
        "best_epoch": state["best_epoch"],
        "best_inner_score": state["best_score"],
        "timing": {
            "train_seconds_per_image": state["train_seconds"] / max(1, state["train_images"]),
            "inference_seconds_per_image": infer_s,
        },
        "logits": logits.tolist(),
    }
    write_json_atomic(done_file, result)
    for f in ckpt_dir.glob("*"):
        f.unlink()
    ckpt_dir.rmdir()
    (fold_dir / "best.safetensors").unlink(missing_ok=True)
    result["logits"] = logits
    return result


def _loader(
    ds: XrayDataset, cfg: Config, *, shuffle: bool = False, seed: int = 0
) -> DataLoader[Any]:
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(
        ds,
        batch_size=cfg.train.batch_size,
        shuffle=shuffle,
        num_workers=cfg.data.num_workers,
        generator=g,
        worker_init_fn=worker_init,
        pin_memory=torch.cuda.is_available(),
        drop_last=False,
    )


def _channels_last(setting: str, model: torch.nn.Module) -> bool:
    if setting == "auto":
        return bool(getattr(model, "channels_last_preferred", False))
    return setting == "on"


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _claim_run_dir(out: Path, cfg: Config) -> None:
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "config.yaml"
    text = cfg.to_yaml()
    if saved.exists() and saved.read_text() != text:
        raise ConfigError(
            f"{out} holds a run with a different config ({saved}); use another --out or delete it"
        )
    write_text_atomic(saved, text)


def _write_bundle_meta(ctx: RunContext) -> None:
    cfg = ctx.cfg
    members = [f"fold{k}/weights.safetensors" for k in range(cfg.cv.folds)]
    write_json_atomic(
        ctx.out / "labels.json",
        {
            "classes": ctx.table.classes,
            "label_column": cfg.data.label_column,
            "positive": ctx.table.classes[-1] if len(ctx.table.classes) == 2 else None,
        },
    )
    write_json_atomic(
        ctx.out / "bundle.json",
        {
            "format": 1,
            "xraycls_version": __version__,
            "model": cfg.model.name,
            "image_size": cfg.model.image_size,
            "num_classes": len(ctx.table.classes),
            "normalization": dict(
                zip(("mean", "std"), normalization_for(cfg.model.name), strict=True)
            ),
            "preprocessing": json.loads(ctx.prep.fingerprint()),
            "weights": "weights.safetensors" if cfg.cv.refit else None,
            "fold_weights": members,
        },
    )


def _write_oof(
    path: Path,
    table: Table,
    folds: np.ndarray,
    logits: np.ndarray,
    probs: np.ndarray,
    floor: np.ndarray,
) -> None:
    cols = (
        ["path", "patient_id", "label", "fold"]
        + [f"prob_{c}" for c in table.classes]
        + [f"logit_{c}" for c in table.classes]
        + [f"floor_prob_{c}" for c in table.classes]
    )
    rows = []
    for i, p in enumerate(table.paths):
        row: dict[str, Any] = {
            "path": p,
            "patient_id": table.groups[i],
            "label": table.classes[table.labels[i]],
            "fold": int(folds[i]),
        }
        for j, c in enumerate(table.classes):
            row[f"prob_{c}"] = f"{probs[i, j]:.6f}"
            row[f"logit_{c}"] = f"{logits[i, j]:.6f}"
            row[f"floor_prob_{c}"] = f"{floor[i, j]:.6f}"
        rows.append(row)
    _write_csv(path, rows, cols)


def _write_csv(path: Path, rows: list[dict[str, Any]], cols: list[str]) -> None:
    from xraycls.manifest import write_table

    write_table(path, rows, cols)


def _append_log(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
        if new:
            w.writeheader()
        w.writerow(row)


def _plot_curves(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with (out / "log.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name in sorted({r["model"] for r in rows}):
        rs = [r for r in rows if r["model"] == name]
        ep = [int(r["epoch"]) + 1 for r in rs]
        a.plot(ep, [float(r["train_loss"]) for r in rs], marker="o", label=name)
        b.plot(ep, [float(r["val_auroc"]) for r in rs], marker="o", label=name)
    a.set(title="training loss", xlabel="epoch")
    b.set(title="inner-validation AUROC", xlabel="epoch")
    a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "training_curves.png", dpi=100)
    plt.close(fig)
