"""The ``xraycls`` command line. Each command is a few lines that call the library.

Only typer and rich are imported at start-up; each command imports what it needs, so
``xraycls --help`` never pays for torch/monai/transformers (monai alone takes ~11 s here).
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    name="xraycls",
    help="Chest X-ray classification: ingest DICOM/PNG/JPEG, train, score, explain. "
    "Research use only, not a medical device.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


class WindowChoice(StrEnum):
    auto = "auto"
    header = "header"
    none = "none"
    percentile = "percentile"


class ResizeChoice(StrEnum):
    letterbox = "letterbox"
    squash = "squash"


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        from xraycls import __version__

        typer.echo(__version__)
        raise typer.Exit()


@app.command()
def ingest(
    src: Annotated[
        Path, typer.Argument(help="A file or folder of DICOM/PNG/JPEG images (recursive).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Output folder: manifest.csv + cache/.")],
    size: Annotated[int, typer.Option(help="Square output size in pixels.")] = 1024,
    labels: Annotated[
        Path | None,
        typer.Option(help="Labels CSV: path,label[,patient_id,...], paths relative to the CSV."),
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Decoding processes (default: CPUs).")] = None,
    resize: Annotated[
        ResizeChoice, typer.Option(help="Keep the aspect ratio or squash.")
    ] = ResizeChoice.letterbox,
    window: Annotated[
        WindowChoice, typer.Option(help="VOI: header when present else percentile (auto).")
    ] = WindowChoice.auto,
    retry_errors: Annotated[
        bool, typer.Option("--retry-errors", help="Decode earlier error rows again.")
    ] = False,
) -> None:
    """Decode images into a uint16 cache and write OUT/manifest.csv (one row per file).

    Resumable: re-running skips files already done. Exit code 0 when the run finished, even if
    some files were errors (see the manifest's status and error columns).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from xraycls.ingest import ingest as run_ingest
    from xraycls.manifest import LabelsError
    from xraycls.preprocess import Preprocessing

    try:
        prep = Preprocessing(image_size=size, resize=resize.value, window=window.value)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("ingest", total=None)
        try:
            summary = run_ingest(
                src,
                out,
                prep=prep,
                labels=labels,
                workers=workers,
                retry_errors=retry_errors,
                on_progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
        except (FileNotFoundError, ValueError, LabelsError) as e:
            console.print(f"[red]error:[/red] {e}")
            raise typer.Exit(2) from e
    typer.echo(f"ingest: {summary.line()}")


@app.command()
def train(
    config: Annotated[Path, typer.Option("--config", help="Experiment YAML (see configs/).")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a key: --set model.name=resnet50 (repeatable)."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Run folder (default runs/<config name>); re-running resumes it."),
    ] = None,
) -> None:
    """Cross-validate a backbone by patient and write a run bundle.

    Prints per-fold and pooled out-of-fold AUROC. The bundle holds config.yaml, per-fold
    safetensors weights, labels.json, metrics.json, oof_predictions.csv and training curves.
    """
    from xraycls.config import load_config
    from xraycls.errors import ConfigError

    try:
        cfg = load_config(config, set_ or [])
    except ConfigError as e:
        console.print(f"[red]config error:[/red] {e}")
        raise typer.Exit(2) from e
    run_dir = out or Path("runs") / config.stem
    from xraycls.models import PretrainedWeightsError
    from xraycls.train import run_training

    try:
        result = run_training(
            cfg, run_dir, log=lambda m: console.print(m, markup=False, highlight=False)
        )
    except (ConfigError, PretrainedWeightsError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    pooled = result.metrics["pooled_oof"]
    typer.echo(
        f"train: pooled OOF AUROC {pooled['auroc']:.4f} (accuracy {pooled['accuracy']:.4f}, "
        f"{result.metrics['n_images']} images, {cfg.cv.folds} folds) in {result.seconds:.0f} s -> {run_dir}"
    )


class CalibrationChoice(StrEnum):
    temperature = "temperature"
    platt = "platt"
    isotonic = "isotonic"


@app.command()
def calibrate(
    run_dir: Annotated[Path, typer.Argument(help="A finished `xraycls train` run folder.")],
    method: Annotated[
        CalibrationChoice, typer.Option(help="platt/isotonic: binary only.")
    ] = CalibrationChoice.temperature,
    target: Annotated[
        str, typer.Option(help="Operating point: sensitivity, specificity or youden.")
    ] = "sensitivity",
    value: Annotated[
        float | None, typer.Option(help="Target rate for sensitivity/specificity.")
    ] = 0.95,
) -> None:
    """Refit the run's calibration (and binary operating threshold) on its out-of-fold logits."""
    from xraycls.bundle import BundleError, calibrate_run
    from xraycls.modelcard import write_model_card

    try:
        cal = calibrate_run(
            run_dir,
            method=method.value,  # type: ignore[arg-type]
            threshold_target=target,  # type: ignore[arg-type]
            threshold_value=None if target == "youden" else value,
        )
        write_model_card(run_dir)
    except (BundleError, ValueError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    line = f"calibrate: {cal['method']}: ECE {cal['before']['ece']:.4f} -> {cal['after_crossfit']['ece']:.4f} (cross-fitted)"
    if "threshold" in cal:
        t = cal["threshold"]
        at = t["oof_at_threshold"]
        line += f"; threshold {t['threshold']:.4f} (OOF sensitivity {at['sensitivity']:.3f}, specificity {at['specificity']:.3f})"
    typer.echo(f"{line} -> {run_dir / 'calibration.json'}")


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A `xraycls train` run folder.")],
    data: Annotated[Path, typer.Option("--data", help="Labels CSV or ingest manifest to score.")],
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default RUN_DIR/eval-<data name>).")
    ] = None,
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% CIs.")] = 1000,
) -> None:
    """Score a labelled set with the bundle's calibration and threshold; metrics with CIs + plots."""
    from xraycls.bundle import BundleError
    from xraycls.evaluate import evaluate_run
    from xraycls.manifest import LabelsError

    target = out or run_dir / f"eval-{data.stem}"
    try:
        evaluate_run(
            run_dir,
            data,
            target,
            n_boot=n_boot,
            log=lambda m: console.print(m, markup=False, highlight=False),
        )
    except (BundleError, LabelsError, ValueError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    typer.echo(f"evaluate: -> {target / 'metrics.json'}")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
