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

import re
import time
import warnings
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
from xraycls.evaluation.metrics import (
    auroc,
    bootstrap_ci,
    classification_metrics,
    delong_test,
    macro_auroc,
    multilabel_bootstrap_ci,
    multilabel_metrics,
    sigmoid,
    softmax,
)
from xraycls.evaluation.splits import holdout_split, patient_folds, positives_per_part
from xraycls.io.files import prepare_output_dir, write_json_atomic, write_text_atomic
from xraycls.io.manifest import read_table, write_table
from xraycls.io.ood import reference_from_files
from xraycls.io.preprocess import ImageCache, Preprocessing
from xraycls.models.runtime import resolve_amp
from xraycls.models.weights import load_weights, normalization_for, save_weights
from xraycls.training.config import Config
from xraycls.training.data import Table, load_table, preflight
from xraycls.training.distill import Teacher, describe
from xraycls.training.distributed import (
    DistContext,
    barrier,
    check_batch,
    init_distributed,
    shutdown,
)
from xraycls.training.floor import floor_features, floor_oof_multilabel, floor_oof_probs
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
    if table.multilabel:
        _check_fold_positives(table, folds, cfg.cv.folds, cfg.data.min_positives)
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
    if cfg.distill is not None:
        ctx.teacher = _open_teacher(ctx, folds, holdout)
    oof_logits = np.zeros((len(table), len(table.classes)), dtype=np.float32)
    fold_metrics, timings = [], []
    kept = "best inner epoch" if cfg.train.select == "best" else "kept the last epoch,"
    for k in range(cfg.cv.folds):
        test, train = np.flatnonzero(folds == k), np.flatnonzero(folds != k)
        result = train_fold(ctx, f"fold{k}", seed=cfg.seed + k, train_idx=train, test_idx=test)
        oof_logits[test] = result.logits
        m = _metrics(result.logits, table.labels[test], table.classes)
        fold_metrics.append({"fold": k, **m, "best_epoch": result.best_epoch})
        timings.append(result.timing)
        second = "auroc_micro" if table.multilabel else "accuracy"
        ctx.tracker.log_metrics(
            {f"fold{k}/{n}": m[n] for n in ("auroc", second)}
            | {f"fold{k}/best_epoch": result.best_epoch}
        )
        log(
            f"fold {k}: {'macro AUROC' if table.multilabel else 'AUROC'} {m['auroc']:.4f}, "
            f"{second.replace('_', ' ')} {m[second]:.4f} ({kept} {result.best_epoch + 1})"
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


def _metrics(logits: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Classification metrics of logits: softmax for classes, sigmoid per finding."""
    if labels.ndim == 2:
        return multilabel_metrics(sigmoid(logits), labels, classes)
    return classification_metrics(softmax(logits), labels, classes)


def _probs(logits: np.ndarray, multilabel: bool) -> np.ndarray:
    return sigmoid(logits) if multilabel else softmax(logits)


def _check_fold_positives(table: Table, folds: np.ndarray, n_folds: int, minimum: int) -> None:
    """Every finding needs ``minimum`` positive (and one negative) images in every fold to be
    evaluated there.

    Raises:
        ConfigError: Naming the finding, the fold and the counts.
    """
    counts = positives_per_part(table.labels, folds, n_folds)
    y = np.asarray(table.labels, np.float64)
    for k in range(n_folds):
        negatives = np.sum(y[folds == k] == 0, axis=0)
        for j, f in enumerate(table.classes):
            if counts[k, j] < minimum or negatives[j] < 1:
                total = int(np.nansum(y[:, j]))
                raise ConfigError(
                    f"data: finding {f!r} has {int(counts[k, j])} positive and "
                    f"{int(negatives[j])} negative image(s) in fold {k} ({total} positives in "
                    f"all, {n_folds} folds; data.min_positives={minimum}): too few to evaluate. "
                    "Use fewer folds (cv.folds), more data, or drop the finding (data.findings)"
                )


def _open_teacher(ctx: RunContext, folds: np.ndarray, holdout: Table) -> Teacher:
    """The distillation teacher, checked against this run's classes, folds and holdout."""
    cfg = ctx.cfg
    assert cfg.distill is not None
    teacher = Teacher.open(
        cfg.distill,
        classes=ctx.table.classes,
        device=ctx.device,
        amp=ctx.amp,
        batch_size=cfg.train.batch_size,
        log=ctx.log,
        multilabel=ctx.table.multilabel,
    )
    teacher.check_folds(ctx.table, folds, holdout, n_folds=cfg.cv.folds)
    ctx.log(describe(teacher.summary()))
    return teacher


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
    if table.multilabel:
        ctx.log(
            f"pooled OOF macro AUROC {pooled['auroc']:.4f} (micro {pooled['auroc_micro']:.4f}) "
            f"over {len(table.classes)} findings; floor (one logistic regression per finding on "
            f"32x32 pixels, same folds) macro AUROC {floor['auroc']:.4f} -> {ctx.out}"
        )
        return
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
    if cfg.distill is not None and not Path(cfg.distill.teacher).is_dir():
        raise ConfigError(f"distill.teacher {cfg.distill.teacher}: no such run folder")
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
        raise ConfigError(f"cv.calibration_holdout: {_name_findings(str(e), table)}") from e
    what = "findings" if table.multilabel else "classes"
    log(
        f"{len(table)} images, {len(np.unique(table.groups))} patients, {what} {table.classes}; "
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


def _name_findings(message: str, table: Table) -> str:
    """A splitter's ``finding #j`` with the finding's name."""
    return re.sub(r"finding #(\d+)", lambda m: f"finding {table.classes[int(m[1])]!r}", message)


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
    if ctx.table.multilabel:
        return floor_oof_multilabel(
            feats, ctx.table.labels, ctx.table.groups, folds, seed=ctx.cfg.seed
        )
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
    distillation = {"distillation": ctx.teacher.summary()} if ctx.teacher is not None else {}
    if oof.labels.ndim == 2:
        return _multilabel_run_metrics(ctx, oof, fold_metrics, timings) | distillation
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
    } | distillation


def _multilabel_run_metrics(
    ctx: RunContext,
    oof: OutOfFold,
    fold_metrics: list[dict[str, Any]],
    timings: list[dict[str, float | None]],
) -> dict[str, Any]:
    """``metrics.json`` of a multi-label run: per finding and macro/micro, the floor per
    finding on the same folds, and each finding's OOF AUROC against the floor's (paired
    DeLong) with a patient-level bootstrap interval."""
    assert oof.floor is not None
    n_boot = ctx.cfg.calibration.n_boot
    probs = sigmoid(oof.logits)
    pooled = multilabel_metrics(probs, oof.labels, oof.classes)
    floor = multilabel_metrics(oof.floor, oof.labels, oof.classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, lo, hi = multilabel_bootstrap_ci(
            macro_auroc, probs, oof.labels, groups=oof.groups, n_boot=n_boot
        )
    pooled["auroc_ci"] = [lo, hi]
    for j, f in enumerate(oof.classes):
        known = ~np.isnan(oof.labels[:, j])
        y, g = oof.labels[known, j].astype(np.int64), oof.groups[known]
        entry = pooled["per_finding"][f]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                _, lo, hi = bootstrap_ci(auroc, probs[known, j], y, groups=g, n_boot=n_boot)
                entry["auroc_ci"] = [lo, hi]
            except ValueError:
                entry["auroc_ci"] = [float("nan"), float("nan")]
            try:
                d = delong_test(y, probs[known, j], oof.floor[known, j])
                entry["vs_floor"] = {"diff": d["diff"], "p_value": d["p_value"]}
            except ValueError:
                entry["vs_floor"] = {"diff": float("nan"), "p_value": float("nan")}
    headline = ("auroc", "auroc_micro", "auprc", "auprc_micro", "ece", "brier")
    infer = [t["inference_seconds_per_image"] for t in timings if t["inference_seconds_per_image"]]
    return {
        "task": "multilabel",
        "pooled_oof": pooled,
        "floor_logreg_32px": floor,
        "folds": fold_metrics,
        "mean_over_folds": {k: float(np.nanmean([f[k] for f in fold_metrics])) for k in headline},
        "n_images": len(oof.labels),
        "n_patients": len(np.unique(oof.groups)),
        "excluded": _count_rows(ctx.out / "excluded.csv"),
        "classes": oof.classes,
        "findings": oof.classes,
        "uncertain": ctx.cfg.data.uncertain,
        "device": str(ctx.device),
        "amp": ctx.amp.describe(),
        "train_seconds_per_image": float(np.mean([t["train_seconds_per_image"] for t in timings])),
        "inference_seconds_per_image": float(np.mean(infer)) if infer else None,
    }


def _write_bundle(ctx: RunContext, oof: OutOfFold, metrics: dict[str, Any]) -> None:
    """Everything a consumer of the run reads: predictions, metrics, identity, calibration,
    model card and the intensity reference for out-of-distribution checks."""
    cfg = ctx.cfg
    write_oof(ctx.out, oof, _probs(oof.logits, ctx.table.multilabel))
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
        task=cfg.data.task,
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
