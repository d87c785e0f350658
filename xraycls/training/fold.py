"""One model of a cross-validation run: its data, network, staged epochs and held-out prediction.

:func:`train_fold` reads top to bottom: datasets (training split by patient into training and
inner validation), the network, :func:`_run_epochs` (the staged loop with checkpoint, resume,
best-epoch choice on the inner set and early stopping), then the held-out fold's logits. The
step itself is :func:`xraycls.training.engine.train_one_epoch`.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from xraycls.evaluation.splits import inner_split
from xraycls.io.files import write_json_atomic
from xraycls.io.manifest import read_table, write_table
from xraycls.io.preprocess import ImageCache, Preprocessing
from xraycls.models.runtime import Amp
from xraycls.models.weights import load_weights, normalization_for, save_weights
from xraycls.training.checkpoint import load_checkpoint, save_checkpoint
from xraycls.training.config import Config, StageConfig
from xraycls.training.data import Table, XrayDataset, worker_init
from xraycls.training.distill import DistillLoss, Teacher
from xraycls.training.distributed import (
    DistContext,
    all_reduce_sum,
    barrier,
    broadcast_buffers,
    check_batch,
    check_ranks_agree,
    gather_predictions,
    wrap,
)
from xraycls.training.engine import (
    StepSchedule,
    build_optimizer,
    class_weights,
    evaluate,
    iter_epochs,
    masked_bce_sum,
    pos_weights,
    set_trainable,
    train_one_epoch,
)
from xraycls.training.tracking import Tracker

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
    "steps",
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
    dist: DistContext = field(default_factory=DistContext)
    """This process's place in a data-parallel run (world 1 when alone)."""
    tracker: Tracker = field(default_factory=Tracker)
    """Experiment tracking (a no-op unless ``tracking`` is configured)."""
    teacher: Teacher | None = None
    """The teacher of a distillation run (``distill:``), else None."""


@dataclass
class TrainResult:
    """What ``xraycls train`` prints and returns."""

    out: Path
    metrics: dict[str, Any]
    seconds: float


@dataclass
class FoldResult:
    """One trained model: its held-out logits (none for the refit model) and what it cost."""

    logits: np.ndarray
    best_epoch: int
    best_inner_score: float
    timing: dict[str, float | None] = field(default_factory=dict)


# --------------------------------------------------------------------------- one model


def train_fold(
    ctx: RunContext,
    name: str,
    *,
    seed: int,
    train_idx: np.ndarray,
    test_idx: np.ndarray | None = None,
) -> FoldResult:
    """Train one model on ``train_idx`` (resuming), or load a finished one; predict ``test_idx``.

    The model's folder ``out/<name>/`` ends with ``weights.safetensors`` and ``result.json``;
    the epoch checkpoints are removed once the fold is done. In a data-parallel run every rank
    trains; rank 0 predicts and writes, the others read its result.
    """
    fold_dir = ctx.out / name
    barrier(ctx.dist)  # no rank looks for a result that rank 0 is still writing
    done = _finished(fold_dir, len(ctx.table.classes))
    if done is not None:
        ctx.log(f"{name}: already trained, reusing")
        return done
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    train_set, val_set = _fold_datasets(ctx, train_idx, seed, name=name)
    model = build_model(ctx)
    state = _run_epochs(ctx, name, model, train_set, val_set, seed)
    model.load_state_dict(load_weights(fold_dir / "best.safetensors"))
    digests = check_ranks_agree(ctx.dist, model)
    if ctx.dist.main:
        save_weights(
            fold_dir / "weights.safetensors",
            model.state_dict(),
            metadata={"model": ctx.cfg.model.name},
        )
        logits, infer_s = _predict_held_out(ctx, model, test_idx)
        write_json_atomic(
            fold_dir / "result.json",
            {
                "best_epoch": state["best_epoch"],
                "best_inner_score": state["best_score"],
                "timing": {
                    "train_seconds_per_image": state["train_seconds"]
                    / max(1, state["train_images"]),
                    "inference_seconds_per_image": infer_s,
                },
                "ranks": {"world": ctx.dist.world, "weight_digests": digests},
                "logits": logits.tolist(),
            },
        )
        for f in (fold_dir / "checkpoint").glob("*"):
            f.unlink()
        (fold_dir / "checkpoint").rmdir()
        (fold_dir / "best.safetensors").unlink(missing_ok=True)
    barrier(ctx.dist)
    result = _finished(fold_dir, len(ctx.table.classes))
    assert result is not None
    return result


def _finished(fold_dir: Path, n_classes: int) -> FoldResult | None:
    path = fold_dir / "result.json"
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    return FoldResult(
        logits=np.array(saved["logits"], dtype=np.float32).reshape(-1, n_classes),
        best_epoch=saved["best_epoch"],
        best_inner_score=saved["best_inner_score"],
        timing=saved["timing"],
    )


def _fold_datasets(
    ctx: RunContext, train_idx: np.ndarray, seed: int, *, name: str = ""
) -> tuple[XrayDataset, XrayDataset]:
    """The training images split by patient into training and inner validation (with the
    teacher's logits of model ``name`` attached when the run distils)."""
    sub = ctx.table.subset(train_idx)
    if ctx.teacher is not None:
        sub = ctx.teacher.attach(name, sub)
    inner_tr, inner_val = inner_split(
        sub.labels, sub.groups, fraction=ctx.cfg.train.inner_val_fraction, seed=seed
    )
    norm = normalization_for(ctx.cfg.model.name)
    train_set = XrayDataset(
        sub.subset(inner_tr),
        ctx.prep,
        cache=ctx.cache,
        augment=ctx.cfg.augment,
        normalization=norm,
        seed=seed,
    )
    val_set = XrayDataset(sub.subset(inner_val), ctx.prep, cache=ctx.cache, normalization=norm)
    return train_set, val_set


def build_model(ctx: RunContext) -> torch.nn.Module:
    from xraycls.models import create_model

    cfg = ctx.cfg
    model = create_model(
        cfg.model.name,
        num_classes=len(ctx.table.classes),
        image_size=cfg.model.image_size,
        pretrained=cfg.model.pretrained,
        grad_checkpointing=cfg.model.grad_checkpointing,
    ).to(ctx.device)
    if _channels_last(cfg.train.channels_last, model):
        model = model.to(memory_format=torch.channels_last)
    return model


def _predict_held_out(
    ctx: RunContext, model: torch.nn.Module, test_idx: np.ndarray | None
) -> tuple[np.ndarray, float | None]:
    """Logits of the held-out fold in ``test_idx`` order, and seconds per image."""
    if test_idx is None or not len(test_idx):
        return np.zeros((0, len(ctx.table.classes)), np.float32), None
    return predict_logits(ctx, model, ctx.table.subset(test_idx))


def predict_logits(
    ctx: RunContext, model: torch.nn.Module, table: Table
) -> tuple[np.ndarray, float]:
    """A model's logits for every image of ``table`` (in table order) and seconds per image."""
    dataset = XrayDataset(
        table, ctx.prep, cache=ctx.cache, normalization=normalization_for(ctx.cfg.model.name)
    )
    ev = evaluate(
        model,
        make_loader(dataset, ctx.cfg),
        classes=ctx.table.classes,
        amp=ctx.amp,
        device=ctx.device,
        channels_last=_channels_last(ctx.cfg.train.channels_last, model),
    )
    return ev["logits"][np.argsort(ev["index"])], ev["seconds"] / max(1, len(table))


def load_trained(ctx: RunContext, weights: Path) -> torch.nn.Module:
    """A trained model of this run, from its weights file."""
    model = build_model(ctx)
    model.load_state_dict(load_weights(weights))
    return model


# --------------------------------------------------------------------------- the epochs


def _run_epochs(
    ctx: RunContext,
    name: str,
    model: torch.nn.Module,
    train_set: XrayDataset,
    val_set: XrayDataset,
    seed: int,
) -> dict[str, Any]:
    """The staged epoch loop of one model, resuming from its last checkpoint.

    After each epoch the model is scored on the inner validation set; the best epoch's weights
    (``train.select: last``: the latest epoch's) are kept in ``best.safetensors``; in the last
    stage, ``train.early_stopping_patience`` epochs without improvement end the loop (not with
    ``select: last``). Returns the loop's state (best epoch, timings).
    """
    cfg, stages, dist = ctx.cfg, ctx.cfg.train.stages, ctx.dist
    fold_dir, ckpt_dir = ctx.out / name, ctx.out / name / "checkpoint"
    loss_fn = _loss(ctx, train_set)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.amp.use_scaler)
    epoch_loader = make_loader(train_set, cfg, shuffle=True, dist=dist)
    steps = math.ceil(len(epoch_loader) / cfg.train.accumulate)
    channels_last = _channels_last(cfg.train.channels_last, model)
    state, optimizer, opt_stage = _restore(ctx, name, model, scaler, stages)
    ddp = wrap(dist, model, ctx.device)  # for the restored stage's trainable parameters
    for g, s, e in iter_epochs(stages):
        if g <= state["epoch"]:
            continue
        stage, last_stage = stages[s], s == len(stages) - 1
        if opt_stage != s or optimizer is None:
            set_trainable(model, stage.train)
            optimizer, opt_stage = build_optimizer(model, stage), s
            ddp = wrap(dist, model, ctx.device)  # DDP hooks only what trains when it is built
        schedule = StepSchedule(
            optimizer,
            total=stage.epochs * steps,
            warmup=int(stage.warmup_epochs * steps),
            start=e * steps,
        )
        torch.manual_seed(seed * 1000 + g)  # dropout / drop-path streams replay after a resume
        train_set.set_epoch(g)
        loader = make_loader(train_set, cfg, shuffle=True, seed=seed * 1000, dist=dist, epoch=g)
        with _batch_bar(ctx, f"{name} epoch {g + 1} [{stage.train}]", len(loader)) as on_batch:
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
                ddp=ddp,
            )
        tr = _global_train_stats(dist, tr)
        broadcast_buffers(dist, model)  # every rank validates (and saves) rank 0's statistics
        val = evaluate(
            model,
            make_loader(val_set, cfg, dist=dist),
            classes=ctx.table.classes,
            amp=ctx.amp,
            device=ctx.device,
            channels_last=channels_last,
            gather=partial(gather_predictions, dist),
        )
        _update_state(
            state,
            tr,
            val,
            g,
            s,
            last_stage,
            model,
            fold_dir,
            write=dist.main,
            keep_last=cfg.train.select == "last",
        )
        if dist.main:
            _log_epoch(ctx, name, g, s, stage, optimizer, tr, val)  # a resume trims re-runs
            save_checkpoint(
                ckpt_dir, f"e{g}", model=model, optimizer=optimizer, scaler=scaler, state=state
            )
        barrier(dist)
        patience = cfg.train.early_stopping_patience
        stop = last_stage and patience and cfg.train.select == "best"
        if stop and state["bad_epochs"] >= patience:  # same on every rank
            ctx.log(f"{name}: early stop after epoch {g + 1}")
            break
    return state


def _global_train_stats(dist: DistContext, tr: dict[str, float]) -> dict[str, float]:
    """An epoch's loss, images and throughput over all ranks."""
    loss_sum, images = all_reduce_sum(dist, [tr["loss"] * tr["images"], tr["images"]])
    return tr | {"loss": loss_sum / max(1.0, images), "images": images}


def _loss(ctx: RunContext, train_set: XrayDataset) -> torch.nn.Module:
    """The training loss of the task: (class-weighted) cross-entropy for one label per image,
    masked BCE-with-logits (optional ``pos_weight``) for findings; inside the distillation loss
    when the training set carries a teacher's logits (the one place a loss is chosen)."""
    multilabel = train_set.table.multilabel
    hard: torch.nn.Module
    if multilabel:
        pw = pos_weights(train_set.table.labels, ctx.table.classes, ctx.cfg.train.pos_weight)
        hard = MaskedBCEWithLogits(None if pw is None else pw.to(ctx.device), ctx.dist)
    else:
        weights = (
            class_weights(train_set.table.labels, len(ctx.table.classes)).to(ctx.device)
            if ctx.cfg.train.class_weighting
            else None
        )
        smoothing = ctx.cfg.train.label_smoothing
        if weights is not None and ctx.dist.enabled:
            hard = GlobalWeightedCrossEntropy(weights, ctx.dist, label_smoothing=smoothing)
        else:
            hard = torch.nn.CrossEntropyLoss(weight=weights, label_smoothing=smoothing)
    distill = ctx.cfg.distill
    if distill is None or train_set.table.teacher_logits is None:
        return hard
    return DistillLoss(
        hard, temperature=distill.temperature, alpha=distill.alpha, multilabel=multilabel
    )


class GlobalWeightedCrossEntropy(torch.nn.Module):
    """Class-weighted cross-entropy normalised by the weights of the *global* batch.

    ``CrossEntropyLoss(weight=w)`` divides by the sum of ``w[y]`` over its batch; with DDP each
    rank would divide by its own shard's sum, and the averaged gradient would differ from one
    process's. Summing, then dividing by the all-reduced sum (times the world size, which DDP's
    gradient averaging divides back out) gives the single-process loss exactly.
    """

    def __init__(self, weight: torch.Tensor, dist: DistContext, *, label_smoothing: float) -> None:
        super().__init__()
        self.weight, self.dist, self.label_smoothing = weight, dist, label_smoothing

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        per_sample = torch.nn.functional.cross_entropy(
            logits, y, weight=self.weight, label_smoothing=self.label_smoothing, reduction="none"
        )
        (total,) = all_reduce_sum(self.dist, [float(self.weight[y].sum())])
        return per_sample.sum() * self.dist.world / total


class MaskedBCEWithLogits(torch.nn.Module):
    """BCE-with-logits averaged over the known labels (NaN = unknown) of the *global* batch.

    In a data-parallel run each rank sums its shard's losses and divides by the all-reduced
    number of known labels (times the world size, which DDP's gradient averaging divides
    back out): the single-process loss exactly, as in :class:`GlobalWeightedCrossEntropy`.
    """

    def __init__(self, pos_weight: torch.Tensor | None, dist: DistContext) -> None:
        super().__init__()
        self.pos_weight, self.dist = pos_weight, dist

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        known, total = masked_bce_sum(logits, y.to(logits.dtype), self.pos_weight)
        if not self.dist.enabled:
            return total / known.clamp(min=1)
        (count,) = all_reduce_sum(self.dist, [float(known)])
        return total * self.dist.world / max(count, 1.0)


def _restore(
    ctx: RunContext,
    name: str,
    model: torch.nn.Module,
    scaler: torch.amp.GradScaler,
    stages: list[StageConfig],
) -> tuple[dict[str, Any], torch.optim.Optimizer | None, int | None]:
    """The loop state after the last finished epoch (fresh when there is no checkpoint)."""
    state: dict[str, Any] = {
        "epoch": -1,
        "best_score": -math.inf,
        "best_epoch": -1,
        "bad_epochs": 0,
        "train_seconds": 0.0,
        "train_images": 0,
    }

    def optimizer_for(saved: dict[str, Any]) -> torch.optim.Optimizer:
        stage = stages[saved["stage"]]
        set_trainable(model, stage.train)
        return build_optimizer(model, stage)

    restored = load_checkpoint(
        ctx.out / name / "checkpoint", model=model, optimizer_factory=optimizer_for, scaler=scaler
    )
    if restored is None:
        if ctx.dist.main:
            _trim_log(ctx.out / "log.csv", name, last_epoch=-1)
        return state, None, None
    state, optimizer = restored
    # An epoch logged but killed before its checkpoint runs again: drop its log row.
    if ctx.dist.main:
        _trim_log(ctx.out / "log.csv", name, last_epoch=state["epoch"])
    ctx.log(f"{name}: resuming after epoch {state['epoch'] + 1}")
    return state, optimizer, state["stage"]


def _update_state(
    state: dict[str, Any],
    tr: dict[str, float],
    val: dict[str, Any],
    g: int,
    s: int,
    last_stage: bool,
    model: torch.nn.Module,
    fold_dir: Path,
    *,
    write: bool = True,
    keep_last: bool = False,
) -> None:
    """Record an epoch: timings, and the best inner-validation score (its weights kept by the
    process that ``write``s). ``keep_last``: every epoch replaces the kept weights, so the fold
    ends with the schedule's last epoch."""
    score = val["auroc"] if not math.isnan(val["auroc"]) else -val["loss"]
    state["train_seconds"] += tr["seconds"]
    state["train_images"] += int(tr["images"])
    if keep_last or score > state["best_score"]:
        state.update(best_score=score, best_epoch=g, bad_epochs=0)
        if write:
            save_weights(fold_dir / "best.safetensors", model.state_dict())
    elif last_stage:
        state["bad_epochs"] += 1
    state.update(epoch=g, stage=s)


def _log_epoch(
    ctx: RunContext,
    name: str,
    g: int,
    s: int,
    stage: StageConfig,
    optimizer: torch.optim.Optimizer,
    tr: dict[str, float],
    val: dict[str, Any],
) -> None:
    row = {
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
        "steps": int(tr["steps"]),
    }
    _append_log(ctx.out / "log.csv", row)
    ctx.tracker.log_metrics(
        {
            f"{name}/train_loss": tr["loss"],
            f"{name}/val_loss": val["loss"],
            f"{name}/val_auroc": val["auroc"],
            f"{name}/lr": optimizer.param_groups[-1]["lr"],
            f"{name}/images_per_s": tr["images"] / tr["seconds"],
        },
        step=g,
    )
    ctx.log(
        f"{name} epoch {g + 1} [{stage.train}]: train loss {tr['loss']:.4f}, "
        f"inner-val AUROC {val['auroc']:.4f} ({tr['seconds']:.0f} s)"
    )


@contextmanager
def _batch_bar(ctx: RunContext, title: str, total: int) -> Iterator[Callable[[float], None]]:
    """A per-batch progress bar for one epoch; yields the per-batch callback (a no-op without
    ``ctx.progress``)."""
    progress = ctx.progress
    if progress is None:
        yield lambda loss: None
        return
    task = progress.add_task(title, total=total, loss=float("nan"))
    try:
        yield lambda loss: progress.update(task, advance=1, loss=loss)
    finally:
        progress.remove_task(task)


def make_loader(
    ds: XrayDataset,
    cfg: Config,
    *,
    shuffle: bool = False,
    seed: int = 0,
    dist: DistContext | None = None,
    epoch: int = 0,
) -> DataLoader[Any]:
    """The loader of one epoch.

    Shuffled, the order is the permutation ``DistributedSampler`` draws from ``seed + epoch``,
    whatever the number of processes: one process takes it ``batch_size`` at a time; N
    processes take interleaved shards of ``batch_size / N``, so that step b of every rank
    together covers exactly the images of one process's step b.
    """
    dist = dist or DistContext()
    g = torch.Generator()
    g.manual_seed(seed + epoch)  # worker seeds (augmentation streams)
    sampler = None
    if shuffle or dist.enabled:
        sampler = DistributedSampler(
            ds, num_replicas=dist.world, rank=dist.rank, shuffle=shuffle, seed=seed, drop_last=False
        )
        sampler.set_epoch(epoch)
    batch = check_batch(dist, cfg.train.batch_size)
    n = len(sampler) if sampler is not None else len(ds)
    return DataLoader(
        ds,
        batch_size=batch,
        sampler=sampler,
        num_workers=cfg.data.num_workers,
        generator=g,
        worker_init_fn=worker_init,
        pin_memory=torch.cuda.is_available(),
        # Batch norm cannot train on one image: a shuffled epoch drops a last batch of one.
        drop_last=shuffle and n % batch == 1,
    )


def _channels_last(setting: str, model: torch.nn.Module) -> bool:
    if setting == "auto":
        return bool(getattr(model, "channels_last_preferred", False))
    return setting == "on"


def _append_log(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
        if new:
            w.writeheader()
        w.writerow(row)


def _trim_log(path: Path, name: str, *, last_epoch: int) -> None:
    """Drop ``name``'s log rows of epochs after ``last_epoch`` (they will run again)."""
    if not path.exists():
        return
    rows = read_table(path)
    kept = [r for r in rows if r["model"] != name or int(r["epoch"]) <= last_epoch]
    if len(kept) != len(rows):
        write_table(path, kept, LOG_COLUMNS)
