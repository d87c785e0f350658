"""``xraycls train``: patient-grouped cross-validation that leaves a run bundle.

Protocol, per outer fold k: the other folds are split again by patient into training and an
inner validation set (``train.inner_val_fraction``); the inner set alone drives early stopping
and the choice of checkpoint, and fold k is predicted once, by the chosen model. Pooled
out-of-fold (OOF) predictions are therefore never used to choose anything, which keeps the
reported AUROC honest (and leaves them clean for fitting a calibrator later).

Resumable: a finished fold is never retrained; an interrupted fold continues from its last
epoch checkpoint. Re-running with the same ``--out`` and config resumes; a different config in
an existing run folder is refused.

Reading order: :func:`run_training` (the run: data, folds, refit, floor, bundle) ->
:func:`xraycls.training.fold.train_fold` (one model) -> :mod:`xraycls.training.engine`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xraycls.bundle.calibration import calibrate_run, served_line
from xraycls.bundle.card import write_model_card
from xraycls.bundle.format import (
    HOLDOUT_FILE,
    INTENSITY_FILE,
    METRICS_FILE,
    Bundle,
    OutOfFold,
    ServedPredictions,
    write_bundle_meta,
    write_oof,
    write_served,
)
from xraycls.errors import ConfigError, OutputError
from xraycls.evaluation.metrics import classification_metrics, softmax
from xraycls.evaluation.splits import holdout_split, patient_folds
from xraycls.io.files import prepare_output_dir, write_json_atomic, write_text_atomic
from xraycls.io.manifest import read_table, write_table
from xraycls.io.ood import reference_from_files
from xraycls.io.preprocess import ImageCache, Preprocessing
from xraycls.models.runtime import resolve_amp
from xraycls.models.weights import load_weights, normalization_for, save_weights
from xraycls.training.config import Config
from xraycls.training.data import Table, load_table, preflight
from xraycls.training.distributed import (
    DistContext,
    barrier,
    check_batch,
    init_distributed,
    shutdown,
)
from xraycls.training.floor import floor_features, floor_oof_probs
from xraycls.training.fold import RunContext, load_trained, predict_logits, train_fold
from xraycls.training.tracking import final_metrics, make_tracker


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


# --------------------------------------------------------------------------- the run


def run_training(
    cfg: Config, out: str | Path, *, log: Callable[[str], None] = print, progress: Any = None
) -> TrainResult:
    """Cross-validate ``cfg`` and write the run bundle to ``out`` (resuming what is there).

    Started by ``torchrun``, every process trains its shard of each batch (data-parallel, see
    :mod:`xraycls.training.distributed`); rank 0 logs and writes the bundle.

    Raises:
        ConfigError: ``out`` holds a run made with a different config, or the data is unusable.
    """
    dist, device = init_distributed(cfg.train.device)
    if not dist.main:
        log, progress = (lambda m: None), None
    try:
        return _run(cfg, Path(out), dist, device, log=log, progress=progress)
    finally:
        shutdown(dist)


def _run(
    cfg: Config,
    out: Path,
    dist: DistContext,
    device: torch.device,
    *,
    log: Callable[[str], None],
    progress: Any,
) -> TrainResult:
    t0 = time.perf_counter()
    ctx, holdout = _prepare(cfg, out, dist, device, log=log, progress=progress)
    try:
        result = _cross_validate(ctx, holdout, t0)
    except BaseException as e:
        ctx.tracker.finish("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    ctx.tracker.finish()
    return result


def _cross_validate(ctx: RunContext, holdout: Table, t0: float) -> TrainResult:
    """The folds, the refit model, then (rank 0) the bundle."""
    cfg, dist, log = ctx.cfg, ctx.dist, ctx.log
    table = ctx.table
    folds = patient_folds(table.labels, table.groups, folds=cfg.cv.folds, seed=cfg.seed)
    _write_csv(
        ctx,
        ctx.out / "folds.csv",
        [
            {"path": p, "patient_id": g, "fold": int(f)}
            for p, g, f in zip(table.paths, table.groups, folds, strict=True)
        ]
        + [
            {"path": p, "patient_id": g, "fold": "holdout"}
            for p, g in zip(holdout.paths, holdout.groups, strict=True)
        ],
        ["path", "patient_id", "fold"],
    )
    oof_logits = np.zeros((len(table), len(table.classes)), dtype=np.float32)
    fold_metrics, timings = [], []
    for k in range(cfg.cv.folds):
        test, train = np.flatnonzero(folds == k), np.flatnonzero(folds != k)
        result = train_fold(ctx, f"fold{k}", seed=cfg.seed + k, train_idx=train, test_idx=test)
        oof_logits[test] = result.logits
        m = classification_metrics(softmax(result.logits), table.labels[test], table.classes)
        fold_metrics.append({"fold": k, **m, "best_epoch": result.best_epoch})
        timings.append(result.timing)
        ctx.tracker.log_metrics(
            {f"fold{k}/{n}": m[n] for n in ("auroc", "accuracy")}
            | {f"fold{k}/best_epoch": result.best_epoch}
        )
        log(
            f"fold {k}: AUROC {m['auroc']:.4f}, accuracy {m['accuracy']:.4f} "
            f"(best inner epoch {result.best_epoch})"
        )
    if cfg.cv.refit:
        refit = train_fold(ctx, "refit", seed=cfg.seed + 1000, train_idx=np.arange(len(table)))
        if dist.main:
            save_weights(
                ctx.out / "weights.safetensors",
                load_weights(ctx.out / "refit" / "weights.safetensors"),
            )
        timings.append(refit.timing)
    if dist.main:
        _finish(ctx, holdout, folds, oof_logits, fold_metrics, timings, t0)
    barrier(dist)  # the other ranks read what rank 0 wrote
    metrics = Bundle.read(ctx.out).metrics()
    return TrainResult(ctx.out, metrics, metrics["wall_seconds"])


def _finish(
    ctx: RunContext,
    holdout: Table,
    folds: np.ndarray,
    oof_logits: np.ndarray,
    fold_metrics: list[dict[str, Any]],
    timings: list[dict[str, float | None]],
    t0: float,
) -> None:
    """Rank 0's end of a run: the floor, the holdout predictions, metrics and the bundle."""
    table = ctx.table
    oof = OutOfFold(
        paths=table.paths,
        groups=table.groups,
        labels=table.labels,
        folds=folds,
        logits=oof_logits.astype(np.float64),
        classes=table.classes,
        floor=_floor(ctx, folds),
    )
    if len(holdout):
        write_served(ctx.out / HOLDOUT_FILE, _served_predictions(ctx, holdout))
    metrics = _run_metrics(ctx, oof, fold_metrics, timings) | {
        "n_holdout_images": len(holdout),
        "wall_seconds": time.perf_counter() - t0,
    }
    _write_bundle(ctx, oof, metrics)
    _track_results(ctx)
    pooled, floor = metrics["pooled_oof"], metrics["floor_logreg_32px"]
    ctx.log(
        f"pooled OOF AUROC {pooled['auroc']:.4f}, accuracy {pooled['accuracy']:.4f}; floor (logistic "
        f"regression on 32x32 pixels, same folds) AUROC {floor['auroc']:.4f} -> {ctx.out}"
    )


def _track_results(ctx: RunContext) -> None:
    """The run's final metrics, plots, report and (optionally) the bundle to the tracker."""
    out = ctx.out
    ctx.tracker.log_metrics(final_metrics(Bundle.read(out).metrics()))
    ctx.tracker.log_artifacts([out / "training_curves.png"], "plots")
    report = ["metrics.json", "MODEL_CARD.md", "calibration.json", "oof_predictions.csv"]
    ctx.tracker.log_artifacts([out / f for f in report], "report")
    mlflow = ctx.cfg.tracking.mlflow
    if mlflow is not None and mlflow.log_bundle:
        files = [out / f for f in ("config.yaml", "bundle.json", "labels.json")]
        files += [out / f for f in ("calibration.json", INTENSITY_FILE, "weights.safetensors")]
        files += sorted(out.glob("fold*/weights.safetensors"))
        ctx.tracker.log_artifacts(files, "bundle")


def _prepare(
    cfg: Config,
    out: Path,
    dist: DistContext,
    device: torch.device,
    *,
    log: Callable[[str], None],
    progress: Any,
) -> tuple[RunContext, Table]:
    """Check everything that can be checked before an epoch runs, then read the data and set
    the calibration holdout aside. Returns the run's context (its table: the development data)
    and the holdout."""
    from xraycls.models import get_spec

    try:
        get_spec(cfg.model.name)  # a misspelt backbone fails here, not after data loading
    except ValueError as e:
        raise ConfigError(f"model.name: {e}") from e
    check_batch(dist, cfg.train.batch_size)
    amp = resolve_amp(cfg.train.amp, device)
    _claim_run_dir(out, cfg, write=dist.main)
    barrier(dist)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    prep = preprocessing_for(cfg)
    cache = ImageCache(cfg.data.cache_dir) if cfg.data.cache_dir else None
    table = load_table(cfg.data, prep, seed=cfg.seed, log=log)
    table, excluded = preflight(table, prep, cache)
    if dist.main:
        write_table(out / "excluded.csv", excluded, ["path", "error"])
    if excluded:
        log(f"{len(excluded)} unreadable images excluded (see {out / 'excluded.csv'})")
    try:
        dev, hold = holdout_split(
            table.labels, table.groups, fraction=cfg.cv.calibration_holdout, seed=cfg.seed
        )
    except ValueError as e:
        raise ConfigError(f"cv.calibration_holdout: {e}") from e
    log(
        f"{len(table)} images, {len(np.unique(table.groups))} patients, classes {table.classes}; "
        f"{len(hold)} images of {len(np.unique(table.groups[hold]))} patients held out to "
        f"calibrate the served models; {cfg.model.name} at {cfg.model.image_size}px on {device} "
        f"({amp.describe()})"
        + (f" x {dist.world} processes" if dist.enabled else "")
        + f"; {cfg.cv.folds}-fold CV on the rest"
    )
    tracker = make_tracker(cfg.tracking, out, main=dist.main)
    tracker.log_params(cfg.model_dump(mode="json"))
    ctx = RunContext(
        cfg, out, table.subset(dev), prep, cache, device, amp, log, progress, dist, tracker
    )
    return ctx, table.subset(hold)


def _served_predictions(ctx: RunContext, holdout: Table) -> ServedPredictions:
    """The logits of each servable configuration on the holdout, which none of its models saw:
    the fold ensemble's (mean over the fold models, as the predictor averages them) and the
    refit model's."""
    members = [ctx.out / f"fold{k}" / "weights.safetensors" for k in range(ctx.cfg.cv.folds)]
    logits = {
        "folds": np.mean(
            [predict_logits(ctx, load_trained(ctx, w), holdout)[0] for w in members], axis=0
        )
    }
    if ctx.cfg.cv.refit:
        refit = load_trained(ctx, ctx.out / "weights.safetensors")
        logits["refit"] = predict_logits(ctx, refit, holdout)[0]
    return ServedPredictions(
        paths=holdout.paths,
        groups=holdout.groups,
        labels=holdout.labels,
        classes=holdout.classes,
        logits=logits,
    )


def _floor(ctx: RunContext, folds: np.ndarray) -> np.ndarray:
    """The 32x32 logistic-regression floor's OOF probabilities on the run's own folds."""
    feats = floor_features(ctx.table, ctx.prep, cache=ctx.cache)
    return floor_oof_probs(
        feats,
        ctx.table.labels,
        ctx.table.groups,
        folds,
        n_classes=len(ctx.table.classes),
        seed=ctx.cfg.seed,
    )


def _run_metrics(
    ctx: RunContext,
    oof: OutOfFold,
    fold_metrics: list[dict[str, Any]],
    timings: list[dict[str, float | None]],
) -> dict[str, Any]:
    """``metrics.json``: pooled OOF and floor metrics, per fold, and what the run cost."""
    assert oof.floor is not None
    headline = ("auroc", "accuracy", "sensitivity", "specificity", "f1", "balanced_accuracy")
    infer = [t["inference_seconds_per_image"] for t in timings if t["inference_seconds_per_image"]]
    return {
        "pooled_oof": classification_metrics(softmax(oof.logits), oof.labels, oof.classes),
        "floor_logreg_32px": classification_metrics(oof.floor, oof.labels, oof.classes),
        "folds": fold_metrics,
        "mean_over_folds": {k: float(np.nanmean([f[k] for f in fold_metrics])) for k in headline},
        "n_images": len(oof.labels),
        "n_patients": len(np.unique(oof.groups)),
        "excluded": _count_rows(ctx.out / "excluded.csv"),
        "classes": oof.classes,
        "device": str(ctx.device),
        "amp": ctx.amp.describe(),
        "train_seconds_per_image": float(np.mean([t["train_seconds_per_image"] for t in timings])),
        "inference_seconds_per_image": float(np.mean(infer)) if infer else None,
    }


def _write_bundle(ctx: RunContext, oof: OutOfFold, metrics: dict[str, Any]) -> None:
    """Everything a consumer of the run reads: predictions, metrics, identity, calibration,
    model card and the intensity reference for out-of-distribution checks."""
    cfg = ctx.cfg
    write_oof(ctx.out, oof, softmax(oof.logits))
    write_json_atomic(ctx.out / METRICS_FILE, metrics)
    write_bundle_meta(
        ctx.out,
        model=cfg.model.name,
        image_size=cfg.model.image_size,
        classes=ctx.table.classes,
        label_column=cfg.data.label_column,
        normalization=normalization_for(cfg.model.name),
        prep=ctx.prep,
        folds=cfg.cv.folds,
        refit=cfg.cv.refit,
        age_range=cfg.data.age_range,
    )
    _plot_curves(ctx.out)
    if cfg.calibration.method != "none":
        cal = calibrate_run(
            ctx.out,
            method=cfg.calibration.method,
            threshold_target=cfg.calibration.threshold_target,
            threshold_value=cfg.calibration.threshold_value,
            n_boot=cfg.calibration.n_boot,
        )
        for name, entry in cal["configurations"].items():
            ctx.log(served_line(name, entry))
    write_model_card(ctx.out, n_boot=cfg.calibration.n_boot)
    reference = reference_from_files(ctx.table.paths, ctx.prep)
    if reference is not None:  # for the out-of-distribution check wherever the bundle goes
        write_json_atomic(ctx.out / INTENSITY_FILE, reference.to_dict())


# --------------------------------------------------------------------------- files


def _claim_run_dir(out: Path, cfg: Config, *, write: bool = True) -> None:
    try:
        prepare_output_dir(out)
    except OutputError as e:
        raise ConfigError(str(e)) from e
    if (out / "manifest.csv").exists() and (out / "ingest.json").exists():
        raise ConfigError(f"--out {out} is an `xraycls ingest` folder; give a run folder")
    saved = out / "config.yaml"
    text = cfg.to_yaml()
    if saved.exists() and saved.read_text() != text:
        raise ConfigError(
            f"{out} holds a run with a different config ({saved}); use another --out or delete it"
        )
    if not write:
        return
    try:
        write_text_atomic(saved, text)
    except (PermissionError, OutputError) as e:
        raise ConfigError(f"--out {out}: not writable ({e})") from e


def _write_csv(ctx: RunContext, path: Path, rows: list[dict[str, Any]], cols: list[str]) -> None:
    if ctx.dist.main:
        write_table(path, rows, cols)


def _count_rows(path: Path) -> int:
    return len(read_table(path)) if path.exists() else 0


def _plot_curves(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_table(out / "log.csv")
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
