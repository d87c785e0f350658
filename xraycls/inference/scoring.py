"""``xraycls predict``: score a file, a folder or a manifest into a resumable results CSV.

Streaming: isolated decoder processes (:class:`~xraycls.io.isolate.DecoderPool`) decode and
preprocess files while this process runs the model; each batch's rows are appended to the CSV,
flushed and fsynced, so a ``kill -9`` at any moment loses at most the batch in flight. Resuming,
torn lines and settings: :mod:`xraycls.inference.results`. One file to one row:
:mod:`xraycls.inference.rows`.

Per-file errors: :func:`~xraycls.inference.rows.load_item` turns every exception of reading a
file into that file's error row, and a decoder process that aborts (a native codec crash), hangs
past the per-file limit or exceeds its memory cap is replaced, its file becoming a
``decoder_crashed`` / ``decoder_timeout`` row; so one bad file never stops the batch. The decoder
processes are fresh interpreters that die with this process (no ``__main__`` guard needed).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from xraycls.bundle.format import Members
from xraycls.inference.outputs import Explainer
from xraycls.inference.results import (
    SETTINGS_VERSION,
    ResultsFile,
    check_settings,
    exclusive,
    require_pyarrow,
    write_parquet,
)
from xraycls.inference.rows import (
    ScoreError,
    load_item,
    load_items,
    result_columns,
    score_items,
)
from xraycls.io.dicom import installation_salt
from xraycls.io.files import prepare_output_dir
from xraycls.io.manifest import read_labels
from xraycls.io.ood import OODCriteria
from xraycls.io.preprocess import Preprocessing
from xraycls.io.read import iter_image_files

if TYPE_CHECKING:
    # Imported where used: decoding workers unpickle this module's dataset, and importing the
    # predictor (calibration -> scikit-learn) would double each worker's start-up time.
    from xraycls.inference.predictor import Predictor

Engine = Literal["local", "ray"]
Backend = Literal["torch", "onnx"]

# --------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    """The files to score, in order, and the folder their output names are made relative to."""

    paths: list[Path]
    root: Path
    source: Path


def collect_inputs(source: str | Path) -> Inputs:
    """Resolve INPUT: an image file, a folder (recursive, as ``xraycls ingest`` scans it) or a
    CSV with a ``path`` column (a labels CSV or an ingest manifest; relative paths are resolved
    against the CSV's folder).

    Raises:
        FileNotFoundError: ``source`` does not exist.
        PermissionError: ``source`` is a folder that cannot be listed.
        LabelsError: The CSV is malformed.
    """
    src = Path(source).resolve()
    if not src.exists():
        raise FileNotFoundError(f"{source}: no such file or folder")
    if src.is_dir():
        if not os.access(src, os.R_OK | os.X_OK):
            raise PermissionError(f"{source}: folder not readable")
        return Inputs(list(iter_image_files(src)), src, src)
    if src.suffix.lower() == ".csv":
        paths = [Path(r["path"]) for r in read_labels(src)]
        root = Path(os.path.commonpath([str(src.parent), *map(str, paths)]))
        return Inputs(paths, root, src)
    return Inputs([src], src.parent, src)


def _stat_key(path: Path) -> tuple[str, str]:
    try:
        st = path.stat()
    except OSError:
        return "", ""
    return str(st.st_size), str(st.st_mtime_ns)


# --------------------------------------------------------------------------- decoding


class ScoringDataset(torch.utils.data.Dataset):
    """Files -> scoring items (see :func:`load_item`); a bad file is an item with its error."""

    def __init__(
        self,
        paths: list[str],
        prep: Preprocessing,
        *,
        keep_original: bool = False,
        ood: OODCriteria | None = None,
    ) -> None:
        self.paths = paths
        self.prep = prep
        self.keep_original = keep_original
        self.ood = ood

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        item = load_item(self.paths[i], self.prep, keep_original=self.keep_original, ood=self.ood)
        # Tensors cross from worker processes through shared memory instead of a pickle pipe.
        for k in ("pixels", "original"):
            if item[k] is not None:
                item[k] = torch.from_numpy(item[k])
        return item


def default_workers() -> int:
    """Decoding processes when not given: the CPU count, at most 8."""
    return min(os.cpu_count() or 1, 8)


# --------------------------------------------------------------------------- the run


@dataclass
class ScoreSummary:
    """What a run did."""

    out: Path
    ok: int = 0
    error: int = 0
    skipped: int = 0
    """Files already scored by an earlier run (same path, size and mtime)."""
    errors_by_code: Counter[str] = field(default_factory=Counter)
    cam_failed: int = 0
    ood_flagged: int = 0
    """Rows written by this run whose out-of-distribution checks flagged the image."""
    seconds: float = 0.0
    """Wall time of the scoring loop (decoding, model, writing; not the model's loading)."""
    parquet: Path | None = None

    @property
    def images_per_s(self) -> float:
        """Files scored per second of the scoring loop."""
        n = self.ok + self.error
        return n / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        """The one-line summary the CLI prints."""
        kinds = ", ".join(
            f"{n} {c}"
            for c, n in sorted(self.errors_by_code.items(), key=lambda kv: (-kv[1], kv[0]))
        )
        parts = [f"{self.ok} ok", f"{self.error} error" + (f" ({kinds})" if kinds else "")]
        parts.append(f"{self.skipped} skipped (already scored)")
        if self.cam_failed:
            parts.append(f"{self.cam_failed} CAM/DICOM outputs failed (see error column)")
        if self.ood_flagged:
            parts.append(f"{self.ood_flagged} flagged out-of-distribution (see ood column)")
        rate = f"{self.images_per_s:.1f} images/s"
        return f"{', '.join(parts)} in {self.seconds:.1f} s ({rate}) -> {self.out}"

    def count(self, row: dict[str, str]) -> None:
        """Add one newly written row to the counts."""
        self.ood_flagged += row.get("ood") == "flagged"
        if row["status"] == "ok":
            self.ok += 1
            self.cam_failed += row["error"].startswith("cam_failed")
        else:
            self.error += 1
            self.errors_by_code[row["error_code"] or "unreadable"] += 1


def score(
    source: str | Path,
    out: str | Path,
    *,
    run: str | Path | Predictor,
    members: Members = "auto",
    calibration: str | None = None,
    device: str = "auto",
    workers: int | None = None,
    batch_size: int = 16,
    cam_dir: str | Path | None = None,
    cam_method: str = "gradcam",
    dicom_out: str | Path | None = None,
    parquet: bool = False,
    engine: Engine = "local",
    backend: Backend = "torch",
    on_progress: Callable[[int, int], None] | None = None,
) -> ScoreSummary:
    """Score every file of ``source`` into the results CSV ``out``, resuming an earlier run.

    Args:
        source: An image file, a folder (scanned recursively) or a CSV with a ``path`` column.
        out: The results CSV (its folder is created).
        run: A run bundle folder, or an already loaded :class:`Predictor` (the Ray engine's
            actors load its ``run_dir`` again, with ``members``).
        members: Which weights of the bundle (see :meth:`Predictor.from_run`).
        calibration: A site calibration's name (default: the bundle's own).
        device: ``auto``, ``cpu``, ``cuda``, ...
        workers: Decoding processes (default :func:`default_workers`); 0 decodes in this
            process.
        batch_size: Files per model batch (and per flushed write).
        cam_dir: Write a CAM overlay PNG per readable file here (mirroring the input tree).
        cam_method: One of ``xraycls.inference.cam.CAM_METHODS``.
        dicom_out: Write a DICOM SR of the findings and a Secondary Capture of the overlay per
            DICOM input here.
        parquet: Also write ``out`` with a ``.parquet`` suffix when the run completes.
        engine: ``local`` (DataLoader) or ``ray`` (Ray Data; needs ``xraycls[distributed]``).
        backend: ``torch``, or ``onnx``: the bundle's ONNX export on onnxruntime (CPU; the
            local engine only). CAMs and Secondary Captures still use the PyTorch weights.
        on_progress: Called with (done, total) after each batch.

    Raises:
        OSError: ``source`` does not exist or cannot be listed; the results cannot be written.
        LabelsError: ``source`` is a malformed CSV.
        BundleError: ``run`` is not a usable run bundle.
        ScoreError: Bad output location, settings mismatch with an earlier run, or a missing
            optional dependency.
    """
    if backend not in ("torch", "onnx"):
        raise ScoreError(f"unknown backend {backend!r}: use torch or onnx")
    if backend == "onnx" and engine == "ray":
        raise ScoreError("--backend onnx runs with the local engine only (not --engine ray)")
    inputs = collect_inputs(source)
    out, cam_dir, dicom_out = _check_outputs(
        inputs, out, cam_dir, dicom_out, batch_size=batch_size, parquet=parquet, engine=engine
    )
    predictor = _predictor(
        run,
        members=members,
        calibration=calibration,
        device=device,
        engine=engine,
        backend=backend,
    )
    explain = None
    if cam_dir is not None or dicom_out is not None:
        explain = Explainer(predictor, inputs.root, cam_method, cam_dir, dicom_out)
    columns = result_columns(predictor.classes, multilabel=predictor.multilabel)
    settings = {
        "version": SETTINGS_VERSION,
        "input": str(inputs.source),
        "run": str(predictor.run_dir.resolve()) if predictor.run_dir else None,
        "model": predictor.describe() | {"run": None, "files": predictor.fingerprint()},
        "preprocessing": predictor.prep.fingerprint(),
        "cam_dir": str(cam_dir) if cam_dir else None,
        "cam_method": cam_method if explain else None,
        "dicom_out": str(dicom_out) if dicom_out else None,
    }
    summary = ScoreSummary(out=out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(out):
        results = ResultsFile(out, columns)
        check_settings(out, settings, out.exists())
        rows, todo = results.resume([(str(p), _stat_key(p)) for p in inputs.paths])
        summary.skipped = len(rows)
        installation_salt()  # create the patient-ID salt once, before workers race for it
        if engine == "ray":
            batches = _ray_batches(todo, predictor, run=run, members=members, batch_size=batch_size)
        else:
            batches = _local_batches(
                todo,
                predictor,
                workers=workers,
                batch_size=batch_size,
                explain=explain,
                journal=out.with_name(f".{out.name}.decoding"),
            )
        t0 = time.perf_counter()
        _record(batches, results, rows, summary, total=len(inputs.paths), on_progress=on_progress)
        summary.seconds = time.perf_counter() - t0
        missing = [p for p, _ in todo if p not in rows]
        if missing:
            raise RuntimeError(f"{len(missing)} files got no result row, e.g. {missing[0]}")
        results.finish(rows[str(p)] for p in inputs.paths)
        if parquet:
            summary.parquet = write_parquet(out, columns)
    return summary


def _check_outputs(
    inputs: Inputs,
    out: str | Path,
    cam_dir: str | Path | None,
    dicom_out: str | Path | None,
    *,
    batch_size: int,
    parquet: bool,
    engine: str,
) -> tuple[Path, Path | None, Path | None]:
    """Resolve and refuse bad output locations and options before any model is loaded."""
    if batch_size < 1:
        raise ScoreError(f"batch size must be at least 1, got {batch_size}")
    if engine not in ("local", "ray"):
        raise ScoreError(f"unknown engine {engine!r}: use local or ray")
    out = Path(out).resolve()
    if out.is_dir():
        raise ScoreError(f"--out {out} is a folder; give the results CSV's file name")
    ingest_dir = (out.parent / "manifest.csv").is_file() and (out.parent / "ingest.json").is_file()
    if ingest_dir and out.name in ("manifest.csv", "ingest.json"):
        raise ScoreError(f"--out {out} is an `xraycls ingest` file; give another results CSV")
    prepare_output_dir(out.parent, option="--out")
    cam = Path(cam_dir).resolve() if cam_dir is not None else None
    dcm = Path(dicom_out).resolve() if dicom_out is not None else None
    for name, d in (("--cam-dir", cam), ("--dicom-out", dcm)):
        if d is not None and inputs.source.is_dir() and d.is_relative_to(inputs.source):
            raise ScoreError(
                f"{name} {d} lies inside the input {inputs.source}; it would be scored"
            )
        if d is not None:
            prepare_output_dir(d, option=name)
    if parquet:
        require_pyarrow()
    if dcm is not None:
        try:
            import highdicom  # noqa: F401
        except ImportError as e:
            raise ScoreError("--dicom-out needs highdicom: pip install 'xraycls[pacs]'") from e
    if engine == "ray" and (cam or dcm):
        raise ScoreError("--cam-dir and --dicom-out are supported by the local engine only")
    return out, cam, dcm


def _predictor(
    run: str | Path | Predictor,
    *,
    members: Members,
    calibration: str | None,
    device: str,
    engine: str,
    backend: Backend = "torch",
) -> Predictor:
    from xraycls.inference.predictor import Predictor

    if isinstance(run, Predictor):
        return run
    # The Ray driver only needs classes and preprocessing: its actors load their own models.
    return Predictor.from_run(
        run,
        members=members,
        calibration=calibration,
        device="cpu" if engine == "ray" else device,
        backend=backend,
    )


def _record(
    batches: Iterator[list[dict[str, str]]],
    results: ResultsFile,
    rows: dict[str, dict[str, str]],
    summary: ScoreSummary,
    *,
    total: int,
    on_progress: Callable[[int, int], None] | None,
) -> None:
    """Append each batch's rows to the results file (fsynced) and count them."""
    done = len(rows)
    if on_progress:
        on_progress(done, total)
    try:
        for batch_rows in batches:
            results.append(batch_rows)
            for r in batch_rows:
                rows[r["path"]] = r
                summary.count(r)
            done += len(batch_rows)
            if on_progress:
                on_progress(done, total)
    finally:
        results.close()


def _ray_batches(
    todo: list[tuple[str, tuple[str, str]]],
    predictor: Predictor,
    *,
    run: str | Path | Predictor,
    members: Members,
    batch_size: int,
) -> Iterator[list[dict[str, str]]]:
    from xraycls.inference.ray_engine import ray_batches

    run_dir = Path(run) if isinstance(run, str | Path) else predictor.run_dir
    if run_dir is None:
        raise ScoreError("--engine ray needs a run folder, not an in-memory model")
    return ray_batches(
        todo,
        run_dir=run_dir,
        members=predictor.configuration,
        calibration=None if predictor.calibration_name == "default" else predictor.calibration_name,
        prep=predictor.prep,
        classes=predictor.classes,
        multilabel=predictor.multilabel,
        batch_size=batch_size,
        ood=predictor.ood,
    )


def _local_batches(
    todo: list[tuple[str, tuple[str, str]]],
    predictor: Predictor,
    *,
    workers: int | None,
    batch_size: int,
    explain: Explainer | None,
    journal: Path | None = None,
) -> Iterator[list[dict[str, str]]]:
    """Rows per batch: isolated decoder processes decode while this process runs the model.

    Decoding runs in a :class:`~xraycls.io.isolate.DecoderPool` (fresh interpreters, replaced
    when one dies, a wall-clock limit and a memory cap per file), so a file that aborts a codec
    is one ``decoder_crashed`` row. Files are queued two batches ahead, so the decoders work
    while the model runs; rows reach the CSV in completion order (it is rewritten in input
    order at the end).
    """
    if not todo:
        return
    n = default_workers() if workers is None else max(0, workers)
    keys = dict(todo)
    items = load_items(
        [p for p, _ in todo],
        predictor.prep,
        workers=n,
        keep_original=explain is not None,
        ood=predictor.ood,
        prefetch=2 * batch_size + n,
        journal=journal,
    )
    batch: list[dict] = []
    for item in items:
        item["size_bytes"], item["mtime_ns"] = keys[item["path"]]
        batch.append(item)
        if len(batch) == batch_size:
            yield _score_batch(predictor, batch, explain)
            batch = []
    if batch:
        yield _score_batch(predictor, batch, explain)


def _score_batch(
    predictor: Predictor, items: list[dict], explain: Explainer | None
) -> list[dict[str, str]]:
    rows, preds = score_items(predictor, items)
    if explain is not None:
        extra = explain(items, preds, rows) / max(1, sum(p is not None for p in preds))
        for r, p in zip(rows, preds, strict=True):
            if p is not None:
                r["seconds"] = f"{float(r['seconds']) + extra:.4f}"
    return rows
