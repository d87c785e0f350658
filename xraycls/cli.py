"""The ``xraycls`` command line. Each command is a few lines that call the library.

Only typer and rich are imported at start-up; each command imports what it needs, so
``xraycls --help`` never pays for torch/monai/transformers (monai alone takes ~11 s here).
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

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

if TYPE_CHECKING:
    from rich.progress import Progress

    from xraycls.training.config import Config


class WindowChoice(StrEnum):
    auto = "auto"
    header = "header"
    none = "none"
    percentile = "percentile"


class ResizeChoice(StrEnum):
    letterbox = "letterbox"
    squash = "squash"


class CalibrationChoice(StrEnum):
    auto = "auto"
    temperature = "temperature"
    platt = "platt"
    vector = "vector"
    isotonic = "isotonic"


class TargetChoice(StrEnum):
    sensitivity = "sensitivity"
    specificity = "specificity"
    youden = "youden"


class MembersChoice(StrEnum):
    auto = "auto"
    refit = "refit"
    folds = "folds"


class EngineChoice(StrEnum):
    local = "local"
    ray = "ray"


class BackendChoice(StrEnum):
    torch = "torch"
    onnx = "onnx"


class ExportFormat(StrEnum):
    onnx = "onnx"


class ExporterChoice(StrEnum):
    auto = "auto"
    dynamo = "dynamo"
    torchscript = "torchscript"


class CamChoice(StrEnum):
    gradcam = "gradcam"
    gradcampp = "gradcam++"
    hirescam = "hirescam"
    eigencam = "eigencam"
    scorecam = "scorecam"


def _progress(*, loss: bool = False) -> Progress:
    """The progress bar of the long-running commands (on stderr, removed when done); ``loss``
    adds the running training loss that ``xraycls train`` reports per batch."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    columns = ["[progress.description]{task.description}", BarColumn(), MofNCompleteColumn()]
    if loss:
        columns.append("loss {task.fields[loss]:.4f}")
    return Progress(*columns, TimeRemainingColumn(), console=console, transient=True)


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        from xraycls import __version__

        typer.echo(__version__)
        raise typer.Exit()
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
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
    from rich.markup import escape

    from xraycls.io.ingest import ingest as run_ingest
    from xraycls.io.manifest import LabelsError
    from xraycls.io.preprocess import Preprocessing

    try:
        prep = Preprocessing(image_size=size, resize=resize.value, window=window.value)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    with _progress() as bar:
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
        except (OSError, ValueError, LabelsError) as e:  # OSError: OutputError, missing SRC
            console.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True, highlight=False)
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
    nproc: Annotated[
        int,
        typer.Option(
            help="Data-parallel processes on this machine (one per GPU, or CPU processes): "
            "runs `torchrun --standalone --nproc_per_node N -m xraycls train ...`.",
            min=1,
        ),
    ] = 1,
) -> None:
    """Cross-validate a backbone by patient and write a run bundle.

    Prints per-fold and pooled out-of-fold AUROC. The bundle holds config.yaml, per-fold
    safetensors weights, labels.json, metrics.json, oof_predictions.csv and training curves.
    Under torchrun (or with --nproc N) each process trains a shard of every batch.
    """
    from rich.markup import escape

    from xraycls.errors import ConfigError
    from xraycls.training.config import load_config

    try:
        cfg = load_config(config, set_ or [])
    except ConfigError as e:
        console.print(f"[red]config error:[/red] {escape(str(e))}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from e
    run_dir = out or Path("runs") / config.stem
    if nproc > 1:
        _torchrun(nproc, config, set_ or [], run_dir)
    _train_run(cfg, run_dir)


def _train_run(cfg: Config, run_dir: Path) -> None:
    """Run a resolved training config into ``run_dir`` and print the summary line."""
    import os

    from rich.markup import escape

    from xraycls.errors import ConfigError, OutputError
    from xraycls.models import PretrainedWeightsError
    from xraycls.training.crossval import run_training

    main_rank = os.environ.get("RANK", "0") == "0"  # other ranks stay quiet
    try:
        with _progress(loss=True) as bar:
            result = run_training(
                cfg,
                run_dir,
                log=lambda m: console.print(m, markup=False, highlight=False),
                progress=bar if main_rank else None,
            )
    except (ConfigError, PretrainedWeightsError) as e:
        console.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from e
    except OutputError as e:  # disk full mid-run: what was written is intact; re-run resumes
        console.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True, highlight=False)
        raise typer.Exit(1) from e
    if not main_rank:
        return
    pooled = result.metrics["pooled_oof"]
    if "accuracy" in pooled:
        what = f"AUROC {pooled['auroc']:.4f} (accuracy {pooled['accuracy']:.4f}, "
    else:  # findings: macro AUROC over the findings, micro beside it
        what = f"macro AUROC {pooled['auroc']:.4f} (micro {pooled['auroc_micro']:.4f}, "
    typer.echo(
        f"train: pooled OOF {what}{result.metrics['n_images']} images, {cfg.cv.folds} folds) "
        f"in {result.seconds:.0f} s -> {run_dir}"
    )


@app.command()
def distill(
    teacher: Annotated[Path, typer.Option("--teacher", help="The teacher's run folder.")],
    config: Annotated[Path, typer.Option("--config", help="The student's experiment YAML.")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a key: --set distill.alpha=0.5 (repeatable)."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Run folder (default runs/<config name>); re-running resumes it."),
    ] = None,
) -> None:
    """Train a student on a teacher run's logits: `train` with the `distill:` section filled.

    The student of fold k learns from the teacher's fold-k model (same folds required and
    checked), at its own backbone and input size; teacher logits are computed once and cached.
    The result is an ordinary bundle (calibrated, scored, viewable).
    """
    from xraycls.errors import ConfigError
    from xraycls.training.config import load_config

    try:
        cfg = load_config(config, [f"distill.teacher={teacher}", *(set_ or [])])
    except ConfigError as e:
        console.print(f"[red]config error:[/red] {e}")
        raise typer.Exit(2) from e
    _train_run(cfg, out or Path("runs") / config.stem)


def _torchrun(nproc: int, config: Path, overrides: list[str], out: Path) -> None:
    """Re-run this ``train`` under torchrun with ``nproc`` local processes (never returns)."""
    import os
    import sys

    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc}", "-m", "xraycls", "train", "--config", str(config),
        "--out", str(out), *[arg for o in overrides for arg in ("--set", o)],
    ]  # fmt: skip
    typer.echo(f"train: {' '.join(cmd[1:])}")
    os.execv(sys.executable, cmd)


@app.command()
def calibrate(
    run_dir: Annotated[Path, typer.Argument(help="A finished `xraycls train` run folder.")],
    method: Annotated[
        CalibrationChoice,
        typer.Option(help="auto: chosen by cross-fitted NLL. platt: 2 classes; vector: 3+."),
    ] = CalibrationChoice.auto,
    target: Annotated[
        TargetChoice, typer.Option(help="How the binary operating point is chosen.")
    ] = TargetChoice.sensitivity,
    value: Annotated[
        float | None, typer.Option(help="Target rate for sensitivity/specificity.")
    ] = 0.95,
    on: Annotated[
        Path | None,
        typer.Option(help="A site's labelled CSV: fit a new, named site calibration on it."),
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="Name of the site calibration (with --on).")
    ] = None,
    members: Annotated[
        MembersChoice, typer.Option(help="The configuration to calibrate on the site (--on).")
    ] = MembersChoice.auto,
    label_column: Annotated[
        str | None, typer.Option(help="Label column of --on (default: the run's).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ... (with --on)")] = "auto",
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% CIs.")] = 1000,
) -> None:
    """Refit what the run serves: its calibration and operating threshold, on its holdout.

    With --on SITE.csv --name SITE, fit a site calibration on a hospital's own labelled images
    instead; it is stored beside the bundle's (never over it) and chosen with --calibration SITE.
    Either way the operating point printed is cross-fitted: measured on patients that neither
    the calibrator nor the threshold was fitted on.
    """
    from xraycls.bundle import BundleError
    from xraycls.bundle.calibration import calibrate_run, served_line
    from xraycls.bundle.card import write_model_card
    from xraycls.io.manifest import LabelsError

    rate = None if target is TargetChoice.youden else value
    log = lambda m: console.print(m, markup=False, highlight=False)  # noqa: E731
    try:
        if on is not None:
            if not name:
                raise typer.BadParameter("--on needs --name SITE", param_hint="--name")
            from xraycls.reports.site import calibrate_site

            calibrate_site(
                run_dir,
                on,
                name,
                members=members.value,  # type: ignore[arg-type]
                label_column=label_column,
                method=method.value,  # type: ignore[arg-type]
                threshold_target=target.value,  # type: ignore[arg-type]
                threshold_value=rate,
                device=device,
                n_boot=n_boot,
                log=log,
            )
            typer.echo(
                f"calibrate: site calibration {name!r} -> {run_dir / 'calibrations' / name}.json"
            )
            return
        cal = calibrate_run(
            run_dir,
            method=method.value,  # type: ignore[arg-type]
            threshold_target=target.value,  # type: ignore[arg-type]
            threshold_value=rate,
            n_boot=n_boot,
        )
        write_model_card(run_dir, n_boot=n_boot)
    except (BundleError, LabelsError, ValueError, OSError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    for configuration, entry in cal["configurations"].items():
        typer.echo(f"calibrate: {served_line(configuration, entry)}")
    typer.echo(f"calibrate: -> {run_dir / 'calibration.json'} (default: {cal['default']})")


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A `xraycls train` run folder.")],
    data: Annotated[Path, typer.Option("--data", help="Labels CSV or ingest manifest to score.")],
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default RUN_DIR/eval-<data name>).")
    ] = None,
    label_column: Annotated[
        str | None, typer.Option(help="Column of --data with the labels (default: the run's).")
    ] = None,
    members: Annotated[
        MembersChoice, typer.Option(help="Refit weights, fold ensemble, or the bundle's default.")
    ] = MembersChoice.auto,
    calibration: Annotated[
        str | None, typer.Option(help="A site calibration's name (default: the bundle's).")
    ] = None,
    by: Annotated[
        list[str] | None,
        typer.Option(help="A column of --data to report subgroups by (repeatable)."),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per model batch.")] = 16,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% CIs.")] = 1000,
) -> None:
    """Score a labelled set with the served model: discrimination, calibration per class,
    decisions at the stored threshold and at argmax, a decision curve and subgroups, with CIs."""
    from xraycls.bundle import BundleError
    from xraycls.io.manifest import LabelsError
    from xraycls.reports.evaluate import evaluate_run

    target = out or run_dir / f"eval-{data.stem}"
    try:
        evaluate_run(
            run_dir,
            data,
            target,
            label_column=label_column,
            members=members.value,  # type: ignore[arg-type]
            calibration=calibration,
            by=by or [],
            batch_size=batch_size,
            device=device,
            n_boot=n_boot,
            log=lambda m: console.print(m, markup=False, highlight=False),
        )
    except (BundleError, LabelsError, ValueError, OSError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    try:  # the bundle's model card lists its external evaluations
        from xraycls.bundle.card import write_model_card

        write_model_card(run_dir)
    except (BundleError, ValueError, OSError) as e:
        console.print(f"[yellow]warning:[/yellow] model card not updated: {e}")
    typer.echo(f"evaluate: -> {target / 'metrics.json'}")


@app.command()
def models(
    all_: Annotated[
        bool, typer.Option("--all", help="Also list the tiny *_test variants used by tests.")
    ] = False,
) -> None:
    """List the registered backbones: family, parameters, input size, pretrained weights."""
    import torch

    from xraycls.models import create_model, get_spec, list_backbones
    from xraycls.training.config import ModelConfig

    size = ModelConfig().image_size
    typer.echo(
        f"{'backbone':<18} {'family':<7} {'parameters':>11}  {'input':>9}  pretrained weights"
    )
    for name in list_backbones():
        spec = get_spec(name)
        if spec.is_test and not all_:
            continue
        with torch.device("meta"):  # shapes only: nothing is allocated or downloaded
            n = sum(
                p.numel() for p in create_model(name, num_classes=2, image_size=224).parameters()
            )
        weights = spec.pretrained_hint or (
            "none (tiny test variant)" if spec.is_test else "none (trained from scratch)"
        )
        typer.echo(f"{name:<18} {spec.family:<7} {n / 1e6:>10.2f}M  {size:>5}x{size:<3}  {weights}")
    typer.echo(
        f"input: the default model.image_size ({size}); any multiple of 32 works (ViT and Swin "
        "weights are interpolated to it). Parameters with a 2-class head."
    )


@app.command()
def compare(
    run_dirs: Annotated[
        list[Path], typer.Argument(help="Run folders trained on the same data set and labels.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Report folder: report.md/json + PNGs.")],
    baseline: Annotated[
        str | None,
        typer.Option(help="Run folder name or backbone to test against (default: the ResNet50)."),
    ] = None,
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% CIs.")] = 1000,
) -> None:
    """Compare runs side by side: AUROC with CIs, DeLong vs baseline and floor, ECE, timings."""
    from xraycls.bundle import BundleError
    from xraycls.reports.compare import compare_runs

    try:
        compare_runs(
            run_dirs,
            out,
            baseline=baseline,
            n_boot=n_boot,
            log=lambda m: console.print(m, markup=False, highlight=False),
        )
    except BundleError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    typer.echo(f"compare: -> {out / 'report.md'}")


def _viewer_script() -> Path:
    """``$XRAYCLS_APP``, else ``app/streamlit_app.py`` beside the package (a source checkout or
    an editable install; a wheel does not carry ``app/``: pass ``--script``)."""
    import os

    env = os.environ.get("XRAYCLS_APP")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "app" / "streamlit_app.py"


@app.command(name="app")
def viewer(
    runs: Annotated[Path, typer.Option(help="Folder searched for run bundles.")] = Path("runs"),
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8501,
    address: Annotated[
        str, typer.Option(help="Address to bind; 0.0.0.0 exposes uploads to the network.")
    ] = "127.0.0.1",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
    max_upload_mb: Annotated[int, typer.Option(help="Per-file upload limit in MB.")] = 200,
    threads: Annotated[
        int, typer.Option(help="Torch CPU threads (0: one per core; 1 on a busy shared CPU).")
    ] = 0,
    script: Annotated[
        Path | None,
        typer.Option(help="The Streamlit script (default: $XRAYCLS_APP or app/streamlit_app.py)."),
    ] = None,
) -> None:
    """Start the viewer (Streamlit): upload radiographs, see calibrated predictions and Grad-CAM.

    Research use only, not a medical device. Uploads are decoded in memory, never stored.
    """
    import importlib.util
    import os
    import subprocess
    import sys

    path = script or _viewer_script()
    if not path.is_file():
        console.print(
            f"[red]error:[/red] viewer script not found at {path}; run from a source checkout, "
            "or pass --script PATH (or set XRAYCLS_APP) to app/streamlit_app.py"
        )
        raise typer.Exit(2)
    if importlib.util.find_spec("streamlit") is None:
        console.print("[red]error:[/red] streamlit is not installed: pip install 'xraycls[app]'")
        raise typer.Exit(2)
    cmd = [
        sys.executable, "-m", "streamlit", "run", str(path),
        "--server.address", address, "--server.port", str(port),
        "--server.headless", "true", "--server.fileWatcherType", "none",
        "--server.maxUploadSize", str(max_upload_mb), "--browser.gatherUsageStats", "false",
        "--client.toolbarMode", "minimal",
        "--", "--runs", str(runs.resolve()), "--device", device,
        "--max-upload-mb", str(max_upload_mb), "--threads", str(threads),
    ]  # fmt: skip
    typer.echo(f"viewer: http://{address}:{port} (runs from {runs.resolve()}; research use only)")
    if os.name != "posix":
        raise typer.Exit(subprocess.call(cmd))
    os.execv(sys.executable, cmd)  # streamlit takes over this process: signals reach it


@app.command()
def predict(
    source: Annotated[
        Path | None,
        typer.Argument(
            metavar="INPUT",
            help="An image, a folder (recursive) or a CSV with a path column (not with "
            "--dicomweb).",
        ),
    ] = None,
    *,
    run: Annotated[Path, typer.Option("--run", help="A `xraycls train` run folder.")],
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="Results CSV (resumed when it exists); with --dicomweb a state folder."
        ),
    ],
    dicomweb: Annotated[
        str | None,
        typer.Option(
            help="Score new CR/DX studies of this DICOMweb service (QIDO/WADO) and store the SR "
            "and overlay back (STOW), e.g. http://pacs:8042/dicom-web.",
        ),
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="With --dicomweb: studies from this date on (YYYYMMDD).")
    ] = None,
    cam_dir: Annotated[
        Path | None, typer.Option(help="Write a CAM overlay PNG per readable file here.")
    ] = None,
    cam_method: Annotated[
        CamChoice, typer.Option(help="Grad-CAM family method for --cam-dir/--dicom-out.")
    ] = CamChoice.gradcam,
    dicom_out: Annotated[
        Path | None,
        typer.Option(help="Write a DICOM SR + overlay Secondary Capture per DICOM input here."),
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Decoding processes (default: CPUs).")] = None,
    batch_size: Annotated[int, typer.Option(help="Files per model batch.")] = 16,
    parquet: Annotated[
        bool, typer.Option("--parquet", help="Also write the results as Parquet at the end.")
    ] = False,
    members: Annotated[
        MembersChoice,
        typer.Option(help="Fold ensemble, refit model, or the bundle's default (auto)."),
    ] = MembersChoice.auto,
    calibration: Annotated[
        str | None, typer.Option(help="A site calibration's name (default: the bundle's).")
    ] = None,
    engine: Annotated[
        EngineChoice, typer.Option(help="local (DataLoader) or ray (Ray Data).")
    ] = EngineChoice.local,
    backend: Annotated[
        BackendChoice,
        typer.Option(
            help="torch, or onnx: the bundle's ONNX export (`xraycls export`) on onnxruntime, "
            "CPU. CAMs always use the PyTorch weights."
        ),
    ] = BackendChoice.torch,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
) -> None:
    """Score images with a run bundle: one row per file with calibrated probabilities.

    Resumable (files already in --out are skipped) and safe to kill. Exit code 0 when the run
    finished, even if some files were errors (see the status and error columns); 2 when the run
    cannot start (bad --run, missing INPUT, --out from other settings).
    """
    from xraycls.bundle import BundleError
    from xraycls.errors import ConfigError
    from xraycls.inference.onnx_backend import ExportError
    from xraycls.inference.scoring import ScoreError, score
    from xraycls.io.manifest import LabelsError

    if (source is None) == (dicomweb is None):
        raise typer.BadParameter("give either INPUT or --dicomweb URL")
    if dicomweb is not None:
        if backend.value != "torch":
            raise typer.BadParameter("--backend onnx is not available with --dicomweb yet")
        _predict_dicomweb(
            dicomweb,
            out,
            run=run,
            since=since,
            batch_size=batch_size,
            cam=cam_method.value,
            device=device,
        )
        return
    with _progress() as bar:
        task = bar.add_task("predict", total=None)
        try:
            summary = score(
                source,
                out,
                run=run,
                members=members.value,  # type: ignore[arg-type]
                calibration=calibration,
                device=device,
                workers=workers,
                batch_size=batch_size,
                cam_dir=cam_dir,
                cam_method=cam_method.value,
                dicom_out=dicom_out,
                parquet=parquet,
                engine=engine.value,  # type: ignore[arg-type]
                backend=backend.value,  # type: ignore[arg-type]
                on_progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
        except (BundleError, ExportError, LabelsError, ScoreError, ConfigError, OSError) as e:
            from rich.markup import escape

            console.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True, highlight=False)
            raise typer.Exit(2) from e
    console.print(f"predict: {summary.line()}", markup=False, highlight=False, soft_wrap=True)


def _pacs_logging() -> None:
    """Log lines on stderr; the DICOM libraries' chatter (which can quote headers) off."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in ("pynetdicom", "highdicom", "dicomweb_client", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _predict_dicomweb(
    url: str, out: Path, *, run: Path, since: str | None, batch_size: int, cam: str, device: str
) -> None:
    from xraycls.bundle import BundleError
    from xraycls.errors import ConfigError
    from xraycls.inference.dicomweb import score_dicomweb
    from xraycls.inference.pacs import DeliveryError
    from xraycls.inference.rows import ScoreError

    _pacs_logging()
    try:
        summary = score_dicomweb(
            url, out, run=run, since=since, batch_size=batch_size, cam_method=cam, device=device
        )
    except (BundleError, ConfigError, ScoreError, DeliveryError, OSError) as e:
        from rich.markup import escape

        console.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from e
    console.print(f"predict: {summary.line()}", markup=False, highlight=False, soft_wrap=True)


@app.command()
def listen(
    run: Annotated[Path, typer.Option("--run", help="A `xraycls train` run folder.")],
    out: Annotated[
        Path, typer.Option("--out", help="State folder: received images, results.csv, outbox.")
    ],
    config: Annotated[
        Path | None, typer.Option(help="YAML file with a `listen:` section (options override).")
    ] = None,
    ae_title: Annotated[str | None, typer.Option(help="Our AE title [XRAYCLS].")] = None,
    bind: Annotated[str | None, typer.Option(help="Address to listen on [127.0.0.1].")] = None,
    port: Annotated[int | None, typer.Option(help="DICOM port [11112].")] = None,
    allow: Annotated[
        list[str] | None, typer.Option(help="Calling AE title allowed to send (repeatable).")
    ] = None,
    dest: Annotated[
        str | None, typer.Option(help="Send results to AE@host:port (C-STORE).")
    ] = None,
    retention_hours: Annotated[
        float | None, typer.Option(help="Keep received images this long after scoring [0].")
    ] = None,
    tls_cert: Annotated[str | None, typer.Option(help="TLS certificate (PEM).")] = None,
    tls_key: Annotated[str | None, typer.Option(help="TLS private key (PEM).")] = None,
    tls_ca: Annotated[
        str | None, typer.Option(help="CA (PEM) that client certificates must chain to.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
) -> None:
    """Receive chest images over DICOM (C-STORE), score each as it arrives and send an SR and an
    overlay Secondary Capture to --dest. Runs until Ctrl-C.

    Images are on disk before they are acknowledged; results survive restarts and a dead
    destination (kept in OUT/outbox and retried). Exit code 2 when it cannot start.
    """
    from xraycls.bundle import BundleError
    from xraycls.errors import ConfigError
    from xraycls.inference.listen import Listener, load_listen_config
    from xraycls.inference.predictor import Predictor
    from xraycls.inference.rows import ScoreError

    _pacs_logging()
    try:
        cfg = load_listen_config(
            config,
            ae_title=ae_title,
            bind=bind,
            port=port,
            allow=allow or None,
            dest=dest,
            retention_hours=retention_hours,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_ca=tls_ca,
        )
        listener = Listener(Predictor.from_run(run, device=device), out, cfg)
        listener.serve()
    except (BundleError, ConfigError, ScoreError, OSError) as e:
        from rich.markup import escape

        console.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from e


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN", help="A `xraycls train` run folder.")],
    format_: Annotated[ExportFormat, typer.Option("--format", help="Export format.")],
    out: Annotated[
        Path | None,
        typer.Option(help="The .onnx file (default RUN/export/<configuration>.onnx)."),
    ] = None,
    members: Annotated[
        MembersChoice, typer.Option(help="Fold ensemble, refit model, or the bundle's default.")
    ] = MembersChoice.auto,
    opset: Annotated[int, typer.Option(help="ONNX opset (recorded in the file).")] = 18,
    exporter: Annotated[
        ExporterChoice,
        typer.Option(help="auto: torch.onnx dynamo, falling back to the TorchScript exporter."),
    ] = ExporterChoice.auto,
    verify_on: Annotated[
        list[Path] | None,
        typer.Option(help="An image to verify on besides the bundle's holdout (repeatable)."),
    ] = None,
    tolerance: Annotated[
        float, typer.Option(help="Largest |logit difference| onnxruntime vs PyTorch accepted.")
    ] = 1e-3,
) -> None:
    """Export the served model (all its members, one graph, dynamic batch) and verify it.

    onnxruntime and PyTorch score the same images (generated ones and the bundle's holdout
    images when readable); the export is kept only when the logits agree within --tolerance and
    every decision is identical. `predict --backend onnx` and the viewer then run it on the CPU
    with the bundle's calibration. Writes a JSON sidecar beside the .onnx file.
    """
    from xraycls.bundle import BundleError
    from xraycls.inference.export import ExportError, export_run

    try:
        result = export_run(
            run_dir,
            fmt=format_.value,
            out=out,
            members=members.value,  # type: ignore[arg-type]
            opset=opset,
            exporter=exporter.value,  # type: ignore[arg-type]
            verify_on=verify_on or [],
            tolerance=tolerance,
            log=lambda m: console.print(m, markup=False, highlight=False),
        )
    except (BundleError, ExportError, OSError) as e:
        from rich.markup import escape

        console.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from e
    console.print(f"export: {result.line()}", markup=False, highlight=False, soft_wrap=True)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
