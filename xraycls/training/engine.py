"""The training loop: plain PyTorch, read top to bottom.

``train_one_epoch`` and ``evaluate`` return dicts. Staged freezing rebuilds the optimizer per
stage; the learning rate is a pure function of the step (warm-up then cosine), so a resumed run
continues on exactly the same schedule without pickling a scheduler.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from xraycls.evaluation.metrics import (
    classification_metrics,
    multilabel_metrics,
    sigmoid,
    softmax,
)
from xraycls.models.runtime import Amp
from xraycls.training.config import StageConfig

# --------------------------------------------------------------------------- freezing


_LAST = re.compile(r"last_stages\((\d+)\)")


def set_trainable(model: nn.Module, spec: str) -> list[nn.Parameter]:
    """Freeze everything but what ``spec`` trains (``head``, ``all`` or ``last_stages(N)``).

    Frozen parameters get ``requires_grad=False``, so they receive no gradient at all (not a
    zero learning rate), and frozen stages run in eval mode so batch-norm statistics stay put.
    """
    stages: list[nn.Module] = model.stages()  # type: ignore[operator]
    head: nn.Module = model.head  # type: ignore[assignment]
    if spec == "all":
        trainable = [*stages, head]
    elif spec == "head":
        trainable = [head]
    elif m := _LAST.fullmatch(spec):
        n = int(m.group(1))
        trainable = [*stages[len(stages) - n :], head] if n else [head]
    else:
        raise ValueError(f"unknown train spec {spec!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    for module in trainable:
        for p in module.parameters():
            p.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def train_mode(model: nn.Module) -> None:
    """``model.train()``, but frozen stages stay in eval mode (batch-norm running stats)."""
    model.train()
    for stage in model.stages():  # type: ignore[operator]
        if not any(p.requires_grad for p in stage.parameters()):
            stage.eval()


def build_optimizer(model: nn.Module, stage: StageConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: no weight decay on norms and biases; with
    ``layer_decay`` each stage ``d`` steps below the head gets ``lr * layer_decay**d``."""
    stages: list[nn.Module] = model.stages()  # type: ignore[operator]
    depth_of: dict[int, int] = {}
    for i, module in enumerate(stages):
        for p in module.parameters():
            depth_of[id(p)] = len(stages) - i
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        depth = depth_of.get(id(p), 0)  # the head is depth 0
        scale = stage.layer_decay**depth if stage.layer_decay else 1.0
        decay = p.ndim > 1
        groups.setdefault((scale, decay), []).append(p)
    param_groups = [
        {
            "params": ps,
            "lr": stage.lr * scale,
            "base_lr": stage.lr * scale,
            "weight_decay": stage.weight_decay if decay else 0.0,
        }
        for (scale, decay), ps in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1]))
    ]
    return torch.optim.AdamW(param_groups, lr=stage.lr)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine decay to 1% over the rest."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class StepSchedule:
    """Sets the learning rate before each optimizer step: warm-up then cosine over a stage."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, *, total: int, warmup: int, start: int = 0
    ) -> None:
        self.optimizer, self.total, self.warmup, self.step = optimizer, total, warmup, start

    def __call__(self) -> None:
        factor = lr_factor(self.step, self.total, self.warmup)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor
        self.step += 1


# --------------------------------------------------------------------------- loops


def train_one_epoch(
    model: nn.Module,
    loader: Any,
    optimizer: torch.optim.Optimizer,
    *,
    loss_fn: nn.Module,
    amp: Amp,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    accumulate: int = 1,
    channels_last: bool = False,
    schedule: Callable[[], None] | None = None,
    on_batch: Callable[[float], None] | None = None,
    ddp: nn.Module | None = None,
) -> dict[str, float]:
    """One pass over ``loader``; returns ``loss`` (mean), ``images``, ``steps`` and ``seconds``.

    Args:
        schedule: Called before each optimizer step (sets the learning rate for that step).
        on_batch: Called with each batch's loss (progress bars).
        ddp: ``model`` wrapped in DistributedDataParallel (data-parallel training): the forward
            goes through it, and gradients are all-reduced only on the micro-batch that steps.
    """
    train_mode(model)
    forward = ddp if ddp is not None else model
    t0 = time.perf_counter()
    total, count, steps = 0.0, 0, 0
    optimizer.zero_grad(set_to_none=True)
    batches = len(loader)
    for i, batch in enumerate(loader):
        x = batch["image"].to(device, non_blocking=True)
        y = batch["label"].to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        stepping = (i + 1) % accumulate == 0 or i + 1 == batches
        sync = ddp.no_sync() if ddp is not None and not stepping else contextlib.nullcontext()
        with sync:
            with amp.autocast():
                out = forward(x).float()
                # Distillation: the loss also takes the teacher's logits of the batch.
                teacher = batch.get("teacher")
                loss = loss_fn(out, y) if teacher is None else loss_fn(out, y, teacher.to(device))
            scaler.scale(loss / accumulate).backward()
        if stepping:
            if schedule is not None:
                schedule()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
        total += float(loss.detach()) * len(y)
        count += len(y)
        if on_batch is not None:
            on_batch(float(loss.detach()))
    return {
        "loss": total / max(1, count),
        "images": float(count),
        "steps": float(steps),
        "seconds": time.perf_counter() - t0,
    }


@torch.no_grad()
def predict(
    model: nn.Module, loader: Any, *, amp: Amp, device: torch.device, channels_last: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits, labels and dataset indices for every sample of ``loader`` (eval mode)."""
    model.eval()
    logits, labels, index = [], [], []
    for batch in loader:
        x = batch["image"].to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with amp.autocast():
            out = model(x)
        logits.append(out.float().cpu().numpy())
        labels.append(batch["label"].numpy())
        index.append(batch["index"].numpy())
    return np.concatenate(logits), np.concatenate(labels), np.concatenate(index)


def evaluate(
    model: nn.Module,
    loader: Any,
    *,
    classes: list[str],
    amp: Amp,
    device: torch.device,
    channels_last: bool = False,
    gather: Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None,
) -> dict[str, Any]:
    """Loss and classification metrics on ``loader``; also returns ``logits``/``labels``/``index``.

    Args:
        gather: For data-parallel runs, collects every rank's predictions (see
            :func:`xraycls.training.distributed.gather_predictions`).
    """
    t0 = time.perf_counter()
    logits, labels, index = predict(
        model, loader, amp=amp, device=device, channels_last=channels_last
    )
    if gather is not None:  # data-parallel: every rank's shard, on every rank
        logits, labels, index = gather(logits, labels, index)
    return score(logits, labels, index, classes) | {"seconds": time.perf_counter() - t0}


def score(
    logits: np.ndarray, labels: np.ndarray, index: np.ndarray, classes: list[str]
) -> dict[str, Any]:
    """Loss and classification metrics of predictions; also returns them.

    Multi-label (``labels`` N x K with NaN unknown): the masked BCE and
    :func:`~xraycls.evaluation.metrics.multilabel_metrics` (``auroc`` is the macro average).
    """
    t = torch.from_numpy(logits)
    if labels.ndim == 2:
        loss = float(masked_bce(t.float(), torch.from_numpy(labels).float()))
        metrics: dict[str, Any] = multilabel_metrics(sigmoid(logits), labels, classes)
        return {"loss": loss, **metrics, "logits": logits, "labels": labels, "index": index}
    loss = float(nn.functional.cross_entropy(t, torch.from_numpy(labels)))
    metrics = classification_metrics(softmax(logits), labels, classes)
    return {"loss": loss, **metrics, "logits": logits, "labels": labels, "index": index}


def class_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights normalised to mean 1 (absent classes get weight 0)."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / n_classes, 0.0)
    return torch.tensor(w / w[w > 0].mean(), dtype=torch.float32)


def masked_bce(
    logits: torch.Tensor, labels: torch.Tensor, pos_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean BCE-with-logits over the known labels of N x K ``labels`` (NaN = unknown: no loss,
    no gradient), ``pos_weight`` per finding as in ``BCEWithLogitsLoss``."""
    known, total = masked_bce_sum(logits, labels, pos_weight)
    return total / known.clamp(min=1)


def masked_bce_sum(
    logits: torch.Tensor, labels: torch.Tensor, pos_weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(number of known labels, summed BCE over them): the parts of :func:`masked_bce`."""
    known = ~torch.isnan(labels)
    per = nn.functional.binary_cross_entropy_with_logits(
        logits, torch.nan_to_num(labels, nan=0.0), pos_weight=pos_weight, reduction="none"
    )
    return known.sum(), (per * known).sum()


def pos_weights(
    labels: np.ndarray, findings: list[str], setting: str | dict[str, float]
) -> torch.Tensor | None:
    """BCE ``pos_weight`` per finding: ``none`` -> None; ``auto`` -> known negatives over
    positives in ``labels`` (the training images); a mapping -> its weights, 1 elsewhere."""
    if setting == "none":
        return None
    if isinstance(setting, dict):
        return torch.tensor([float(setting.get(f, 1.0)) for f in findings], dtype=torch.float32)
    y = np.asarray(labels, np.float64)
    pos = np.nansum(y, axis=0)
    neg = np.sum(y == 0, axis=0)
    return torch.tensor(np.where(pos > 0, neg / np.maximum(pos, 1), 1.0), dtype=torch.float32)


def iter_epochs(stages: list[StageConfig]) -> Iterator[tuple[int, int, int]]:
    """``(global_epoch, stage_index, epoch_in_stage)`` for the whole schedule."""
    g = 0
    for s, stage in enumerate(stages):
        for e in range(stage.epochs):
            yield g, s, e
            g += 1
