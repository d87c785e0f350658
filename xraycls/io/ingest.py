"""``xraycls ingest``: decode a folder of radiographs into a cache and a manifest.

Resumable and crash-safe: each finished file is appended (flushed) to ``.manifest.journal.csv``;
``manifest.csv`` is rewritten atomically from the previous manifest plus the journal at the start
and at the end of every run. A file whose path, size and mtime match a manifest row made with the
same preprocessing is not decoded again. The source tree is only ever read.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from xraycls.errors import ImageReadError, OutputError
from xraycls.io.dicom import installation_salt
from xraycls.io.files import output_error, prepare_output_dir, write_json_atomic
from xraycls.io.isolate import DecodeJournal, DecoderPool, run_journaled
from xraycls.io.manifest import MANIFEST_COLUMNS, Journal, read_labels, read_table, write_table
from xraycls.io.preprocess import ImageCache, Preprocessing, preprocess_file
from xraycls.io.read import iter_image_files, read_bytes

MANIFEST = "manifest.csv"
JOURNAL = ".manifest.journal.csv"
SETTINGS = "ingest.json"


@dataclass
class IngestSummary:
    """What a run did."""

    manifest: Path
    ok: int = 0
    error: int = 0
    reused: int = 0
    """Rows kept from an earlier run without decoding."""
    ignored: list[str] = field(default_factory=list)
    """Files under SRC that are neither images by extension nor by content."""
    errors_by_code: Counter[str] = field(default_factory=Counter)
    unlabelled_in_csv: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        """The one-line summary the CLI prints."""
        kinds = ", ".join(
            f"{n} {c}"
            for c, n in sorted(self.errors_by_code.items(), key=lambda kv: (-kv[1], kv[0]))
        )
        parts = [f"{self.ok} ok", f"{self.error} error" + (f" ({kinds})" if kinds else "")]
        if self.reused:
            parts.append(f"{self.reused} unchanged from the previous run")
        if self.ignored:
            parts.append(f"{len(self.ignored)} non-image files ignored")
        if self.unlabelled_in_csv:
            parts.append(f"{self.unlabelled_in_csv} labels-CSV rows not found under SRC")
        return f"{', '.join(parts)} in {self.seconds:.1f} s -> {self.manifest}"


def ingest(
    src: str | Path,
    out: str | Path,
    *,
    prep: Preprocessing | None = None,
    labels: str | Path | None = None,
    workers: int | None = None,
    retry_errors: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> IngestSummary:
    """Ingest every image under ``src`` into ``out`` (``manifest.csv`` + ``cache/``).

    Args:
        src: A file or a folder (scanned recursively).
        out: Output folder; must not lie inside ``src``.
        prep: Preprocessing (size, resize mode, window). Default: 1024², letterbox, auto window.
        labels: A labels CSV (``path,label[,patient_id,...]``, paths relative to the CSV). Without
            it a file's label is its parent folder's name (none for files directly in ``src``).
        workers: Isolated decoding processes (default: CPU count, at most 8); 0 decodes in this
            process (no isolation from codec crashes).
        retry_errors: Decode files again whose earlier row is an error.
        on_progress: Called with (done, total) after each file.

    Raises:
        FileNotFoundError: ``src`` does not exist.
        ValueError: ``out`` lies inside ``src``, or the labels CSV is malformed.
    """
    t0 = time.perf_counter()
    prep = prep or Preprocessing()
    src, out = Path(src).resolve(), Path(out).resolve()
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or folder")
    if src.is_dir() and out.is_relative_to(src):
        raise ValueError(f"--out {out} lies inside the source {src}; ingest never writes there")
    if (
        (out / "config.yaml").is_file()
        and (out / MANIFEST).exists() is False
        and any((out / name).exists() for name in ("labels.json", "metrics.json", "folds"))
    ):
        raise ValueError(
            f"--out {out} is an `xraycls train` run folder; give ingest its own folder"
        )
    prepare_output_dir(out)
    cache = ImageCache(out / "cache")
    label_rows = {r["path"]: r for r in read_labels(labels)} if labels else None
    extra_cols = _extra_columns(label_rows)
    columns = MANIFEST_COLUMNS + extra_cols

    previous = _fold_previous_run(out, prep, columns, src, labels)
    files = list(iter_image_files(src))
    summary = IngestSummary(manifest=out / MANIFEST)
    summary.ignored = _ignored_files(src, files)
    if label_rows is not None:
        found = {str(p) for p in files}
        summary.unlabelled_in_csv = sum(1 for p in label_rows if p not in found)

    rows: dict[str, dict[str, str]] = {}
    todo: list[Path] = []
    for p in files:
        old = previous.get(str(p))
        if old is not None and _still_valid(old, p, out, retry_errors):
            rows[str(p)] = old | _label_fields(p, src, label_rows, old)
            summary.reused += 1
        else:
            todo.append(p)

    installation_salt()  # create the patient-ID salt once, before workers race for it
    done = len(rows)
    with Journal(out / JOURNAL, columns) as journal:
        for row in _run(todo, prep, cache.root, workers):
            path = Path(row["path"])
            row["cache_path"] = os.path.relpath(row["cache_path"], out) if row["cache_path"] else ""
            row |= _label_fields(path, src, label_rows, row)
            try:
                journal.append(row)
            except OSError as e:  # disk full mid-run: the manifest is intact, the run resumes
                raise output_error(out / JOURNAL, e) from e
            rows[row["path"]] = row
            done += 1
            if on_progress:
                on_progress(done, len(files))

    final = [rows[str(p)] for p in files]
    write_table(out / MANIFEST, final, columns)
    (out / JOURNAL).unlink(missing_ok=True)
    for r in final:
        if r["status"] == "ok":
            summary.ok += 1
        else:
            summary.error += 1
            summary.errors_by_code[r["error"].split(":", 1)[0]] += 1
    summary.seconds = time.perf_counter() - t0
    return summary


def process_one(path: str, prep: Preprocessing, cache_root: str) -> dict[str, str]:
    """Decode one file into a manifest row; never raises for a bad file (worker entry point)."""
    p = Path(path)
    row: dict[str, str] = {"path": path, "status": "error", "error": "", "cache_path": ""}
    try:
        st = p.stat()
        row |= {"size_bytes": str(st.st_size), "mtime_ns": str(st.st_mtime_ns)}
        data = read_bytes(p)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # conversions are recorded in the row's warnings
            res = preprocess_file(p, prep, cache=ImageCache(cache_root), data=data, reuse=False)
    except ImageReadError as e:
        row["error"] = e.short()
        return row
    except (KeyboardInterrupt, SystemExit, OutputError):  # the cache cannot be written: stop
        raise
    except BaseException as e:  # a decoder bug (or a native panic) must cost one row, not the batch
        row["error"] = f"internal_error: {type(e).__name__}: {e}"
        return row
    m = res.meta
    assert m is not None
    row |= {
        "status": "ok",
        "id": res.content_sha256[:20],
        "cache_path": str(res.cache_path or ""),
        "patient_id": m.patient_hash or "",
        "modality": m.modality or "",
        "body_part": m.body_part or "",
        "view_position": m.view_position or "",
        "photometric": m.photometric or "",
        "rows": str(m.original_shape[0]),
        "cols": str(m.original_shape[1]),
        "pixel_spacing": ""
        if m.pixel_spacing is None
        else f"{m.pixel_spacing[0]:g}\\{m.pixel_spacing[1]:g}",
        "window": m.window_applied,
        "warnings": "; ".join(m.warnings),
        "sop_instance_uid": m.sop_instance_uid or "",
        "study_instance_uid": m.study_instance_uid or "",
    }
    return row


def _run(
    todo: list[Path], prep: Preprocessing, cache_root: Path, workers: int | None
) -> Iterator[dict[str, str]]:
    """Yield rows as files finish, each file decoded in an isolated decoder process.

    A decoder that aborts, hangs past the per-file limit or exceeds its memory cap costs only
    its file (a ``decoder_crashed`` / ``decoder_timeout`` row, kept on re-runs like any error);
    the pool replaces it and decodes the rest. ``workers=0`` decodes in this process (no
    isolation).
    """
    n = min(os.cpu_count() or 1, 8) if workers is None else workers
    if n <= 0:  # in this process, through a journal (see DecodeJournal)
        journal = DecodeJournal(cache_root.parent / ".decoding")
        for i, out in run_journaled(
            journal, process_one, [str(p) for p in todo], prep, str(cache_root)
        ):
            yield _failed_row(todo[i], out) if isinstance(out, ImageReadError) else out
        journal.close()
        return
    with DecoderPool(min(n, max(1, len(todo)))) as pool:
        for i, out in pool.imap_unordered(
            process_one, [str(p) for p in todo], prep, str(cache_root)
        ):
            if isinstance(out, ImageReadError):
                yield _failed_row(todo[i], out)
            else:
                yield out


def _failed_row(path: Path, error: ImageReadError) -> dict[str, str]:
    row = {"path": str(path), "status": "error", "error": error.short(), "cache_path": ""}
    try:
        st = path.stat()
        row |= {"size_bytes": str(st.st_size), "mtime_ns": str(st.st_mtime_ns)}
    except OSError:
        pass
    return row


def _fold_previous_run(
    out: Path, prep: Preprocessing, columns: list[str], src: Path, labels: str | Path | None
) -> dict[str, dict[str, str]]:
    """Rows of earlier runs (manifest + a killed run's journal) still usable with ``prep``.

    Also records this run's settings, so that a later run can tell whether rows match it.
    """
    manifest, journal, settings = out / MANIFEST, out / JOURNAL, out / SETTINGS
    try:
        same = json.loads(settings.read_text())["preprocessing"] == prep.fingerprint()
    except (OSError, ValueError, KeyError):
        same = False
    rows: dict[str, dict[str, str]] = {}
    if same:
        rows = {r["path"]: r for r in (read_table(manifest) if manifest.exists() else [])}
        rows.update({r["path"]: r for r in Journal.read(journal)})
        if journal.exists():  # fold a killed run's journal in, so this run's starts empty
            write_table(manifest, rows.values(), columns)
    journal.unlink(missing_ok=True)
    _write_settings(out, src, prep, labels)
    return rows


def _still_valid(old: dict[str, str], p: Path, out: Path, retry_errors: bool) -> bool:
    try:
        st = p.stat()
    except OSError:
        return False
    if old.get("size_bytes") != str(st.st_size) or old.get("mtime_ns") != str(st.st_mtime_ns):
        return False
    if old.get("status") == "ok":
        return bool(old.get("cache_path")) and (out / old["cache_path"]).is_file()
    return not retry_errors


def _label_fields(
    p: Path, src: Path, label_rows: dict[str, dict[str, str]] | None, row: dict[str, str]
) -> dict[str, str]:
    if label_rows is None:
        parent = p.parent
        return {"label": parent.name if src.is_dir() and parent != src else ""}
    lab = label_rows.get(str(p))
    if lab is None:
        return {"label": ""}
    fields = {k: v for k, v in lab.items() if k not in ("path", "patient_id")}
    if lab.get("patient_id"):
        fields["patient_id"] = lab["patient_id"]
    elif "patient_id" not in row:
        fields["patient_id"] = ""
    fields.setdefault("label", "")
    return fields


def _extra_columns(label_rows: dict[str, dict[str, str]] | None) -> list[str]:
    if not label_rows:
        return []
    first = next(iter(label_rows.values()))
    return [k for k in first if k not in MANIFEST_COLUMNS]


def _ignored_files(src: Path, inputs: list[Path]) -> list[str]:
    if not src.is_dir():
        return []
    chosen = set(inputs)
    return sorted(
        str(Path(d) / f) for d, dirs, fs in os.walk(src) for f in fs if (Path(d) / f) not in chosen
    )


def _write_settings(out: Path, src: Path, prep: Preprocessing, labels: str | Path | None) -> None:
    from xraycls import __version__

    write_json_atomic(
        out / SETTINGS,
        {
            "source": str(src),
            "labels": str(Path(labels).resolve()) if labels else None,
            "preprocessing": prep.fingerprint(),
            "xraycls_version": __version__,
        },
    )
